"""POSIX ACLs through a real mount: ``setfacl``/``getfacl`` as on ext4, enforced by the
kernel for real users, with the key service still deciding every open; ACLs planted in the
backing folder; a mount run by a user who is not root.

Every test mounts for real (root and ``/dev/fuse`` needed) and unmounts, failing or not;
users made with ``useradd`` are deleted again (the ``users`` fixture of
``test_mount_security``).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from envfs.identity import Caller
from envfs.kms.policy import default_policy
from tests.integration.conftest import (
    ENVFS,
    Env,
    Mount,
    backing_of,
    is_mounted,
    live,
    mounted,
)
from tests.integration.test_mount_security import (
    User,
    awaited_records,
    create_key,
    kms,
    new_volume,
    users,  # noqa: F401 - a fixture
    warnings_naming,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting for other users needs root"),
    pytest.mark.skipif(
        not (shutil.which("setfacl") and shutil.which("getfacl")),
        reason="needs setfacl and getfacl (apt package acl)",
    ),
]

ACCESS = "system.posix_acl_access"


def sh(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-ec", script], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )


def acl_errno(path: Path) -> int:
    """The errno of reading ``path``'s access ACL (0 if it reads)."""
    try:
        os.getxattr(path, ACCESS)
    except OSError as exc:
        return exc.errno or 0
    return 0


@pytest.fixture
def outside() -> Iterator[Path]:
    """A folder other users can reach (not under pytest's 0700 temporary folder)."""
    path = Path(tempfile.mkdtemp(prefix="envfs-acl-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- 1. the same commands give the same ACLs and modes as on ext4 ---------------------------

# Run by root in a folder of the host's filesystem and in the mount. The umask changes on
# the way; named entries use the users and groups every Debian has.
SCRIPT = """
umask 022
mkdir d plain; touch f f2
setfacl -m u:nobody:rw,g:nogroup:r f
setfacl -m u:nobody:rwx d
setfacl -d -m u:nobody:rwx,g::rwx,o::- d
chmod 640 f
(umask 077; touch d/inherited; mkdir d/sub d/gone; mkfifo d/fifo; mkdir -m 700 d/narrow)
touch d/sub/deeper
setfacl -m m::r d/sub
setfacl -x u:nobody f
setfacl -b d/sub/deeper
setfacl -k d/sub
setfacl --set u::rw,g::r,o::- f2
chmod 2775 d && mkdir d/setgid
setfacl -m u:nobody:r d/setgid/../inherited
(umask 027; touch plain/x; mkdir plain/y)
rmdir d/gone
"""
PATHS = "d f f2 plain d/inherited d/sub d/fifo d/narrow d/sub/deeper d/setgid plain/x plain/y"
REPORT = f"""
getfacl -p {PATHS}
stat -c '%a %F %n' {PATHS}
ls -ld {PATHS} | cut -d' ' -f1
"""


def test_setfacl_getfacl_and_modes_are_as_on_ext4(vol: Mount, tmp_path: Path) -> None:
    host = tmp_path / "ext4"
    host.mkdir()
    probe = sh("touch p && setfacl -m u:nobody:r p", host)
    if probe.returncode != 0:
        pytest.skip(f"the host folder has no ACLs to compare with: {probe.stderr.strip()}")
    (host / "p").unlink()
    expected = sh(SCRIPT + REPORT, host)
    assert expected.returncode == 0, expected.stderr
    got = sh(SCRIPT + REPORT, vol.mnt)
    assert got.returncode == 0, got.stderr
    assert got.stdout == expected.stdout
    assert "user:nobody:rwx" in got.stdout and "default:user:nobody:rwx" in got.stdout
    # The ACLs live in private names of the backing entries, nowhere else.
    backing = backing_of(vol, "d/inherited")
    assert set(os.listxattr(backing)) == {"trusted.envfs.acl_access"}
    assert set(os.listxattr(vol.mnt / "d" / "inherited")) == {ACCESS}
    assert os.listxattr(vol.mnt / "f2") == []


TREE = """
mkdir -p t/sub && echo data > t/f && echo more > t/sub/g
setfacl -m u:nobody:rw,g:daemon:r t/f
setfacl -d -m u:nobody:rx t/sub && setfacl -m u:nobody:rx t/sub
"""


@pytest.mark.parametrize(
    "copy",
    [
        "cp -a {src}/t {dst}/t",
        "rsync -aA {src}/t/ {dst}/t/",
        "tar --acls -C {src} -cf - t | tar --acls -C {dst} -xf -",
    ],
    ids=["cp", "rsync", "tar"],
)
def test_copying_tools_keep_acls_into_and_out_of_the_mount(
    vol: Mount, tmp_path: Path, copy: str
) -> None:
    """cp -a, rsync -A and tar --acls carry ACLs into the plaintext view and back out, as
    between two ext4 folders (gocryptfs answers EOPNOTSUPP and they are lost)."""
    host, back = tmp_path / "host", tmp_path / "back"
    host.mkdir()
    back.mkdir()
    made = sh(TREE, host)
    if made.returncode != 0:
        pytest.skip(f"the host folder has no ACLs to copy: {made.stderr.strip()}")

    def report(where: Path) -> list[str]:
        """getfacl's entry for each path, in name order (not readdir's)."""
        return sorted(sh("getfacl -Rp t", where).stdout.split("\n\n"))

    expected = report(host)
    assert any("user:nobody:rw-" in entry for entry in expected), expected
    assert any("default:user:nobody:r-x" in entry for entry in expected), expected
    into = sh(copy.format(src=host, dst=vol.mnt), host)
    assert into.returncode == 0, into.stderr
    assert report(vol.mnt) == expected
    out = sh(copy.format(src=vol.mnt, dst=back), host)
    assert out.returncode == 0, out.stderr
    assert report(back) == expected
    assert (back / "t" / "sub" / "g").read_text() == "more\n"


def test_noacl_turns_them_off(kms_env: Env) -> None:
    kms_env.create_key("vol")
    with mounted(kms_env, extra=("-o", "noacl")) as m:
        refused = sh("touch f && setfacl -m u:nobody:r f", m.mnt)
        assert "Operation not supported" in refused.stderr
        assert sh("umask 027 && mkdir d && touch d/f", m.mnt).returncode == 0
        assert stat.S_IMODE((m.mnt / "d").stat().st_mode) == 0o750
        assert stat.S_IMODE((m.mnt / "d" / "f").stat().st_mode) == 0o640
        assert "POSIX ACLs off (-o noacl)" in m.log_text()


# --- 2. the kernel enforces them for real users; the key service decides on top --------------


def test_acls_are_enforced_for_users_and_keys_still_decide(
    kms_env: Env,
    users: dict[str, User],  # noqa: F811 - the fixture
    outside: Path,
) -> None:
    owner, colleague, stranger = users["usr"], users["mgr"], users["str"]
    arn = create_key(kms_env, "shared")
    m = new_volume(kms_env, "shared", "shared", "--allow-other")
    # Root manages the key; the owner and the colleague use it, the stranger does not.
    policy = default_policy(["uid:0"], [f"user:{owner.name}", f"user:{colleague.name}"])
    kms(kms_env, "put-key-policy", "--key-id", arn, "--policy", policy)
    m.mnt = outside / "mnt"
    m.mnt.mkdir()
    try:
        with live(m):
            m.mnt.chmod(0o777)
            top = m.mnt

            # The owner keeps a file to themselves; the colleague (a key user) is refused
            # by the kernel, until an ACL names them.
            made = owner.sh(
                f"cd {top} && umask 077 && echo secret > private && echo open > public"
                f" && chmod 644 public && setfacl -m u:{colleague.name}:- public"
            )
            assert made.returncode == 0, made.stderr
            assert colleague.probe(("read", top / "private", "")) == [errno.EACCES]
            assert colleague.probe(("read", top / "public", "")) == [errno.EACCES]
            assert owner.probe(("read", top / "public", "")) == ["open\n"]
            granted = owner.sh(
                f"setfacl -m u:{colleague.name}:rw,u:{stranger.name}:r {top / 'private'}"
            )
            assert granted.returncode == 0, granted.stderr
            assert colleague.probe(
                ("append", top / "private", "from the colleague\n"), ("read", top / "private", "")
            ) == ["ok", "secret\nfrom the colleague\n"]
            # The ACL lets the stranger through; the key service does not.
            assert stranger.probe(("read", top / "private", "")) == [errno.EACCES]
            # Only the owner changes ACLs (the kernel says so).
            refused = colleague.sh(f"setfacl -m u:{colleague.name}:rwx {top / 'public'}")
            assert "Operation not permitted" in refused.stderr
            # A chmod sets the mask: nobody named gets more than the group bits.
            assert owner.sh(f"chmod 600 {top / 'private'}").returncode == 0
            assert colleague.probe(("read", top / "private", "")) == [errno.EACCES]
            assert owner.sh(f"chmod 660 {top / 'private'}").returncode == 0
            assert colleague.probe(("read", top / "private", "")) == [
                "secret\nfrom the colleague\n"
            ]
            shown = owner.sh(f"getfacl -p {top / 'private'}")
            assert f"user:{colleague.name}:rw-\n" in shown.stdout
            assert "mask::rw-\n" in shown.stdout

            # A shared folder: its default ACL beats the umask for files either of them makes.
            folder = owner.sh(
                f"cd {top} && mkdir team && setfacl -m u:{colleague.name}:rwx team && "
                f"setfacl -d -m u:{owner.name}:rwx,u:{colleague.name}:rwx team"
            )
            assert folder.returncode == 0, folder.stderr
            assert owner.sh(f"cd {top}/team && umask 077 && echo plan > plan").returncode == 0
            assert colleague.sh(f"cd {top}/team && umask 077 && echo ok > reply").returncode == 0
            assert colleague.probe(("append", top / "team" / "plan", "agreed\n")) == ["ok"]
            team = top / "team"
            assert owner.probe(("read", team / "plan", ""), ("read", team / "reply", "")) == [
                "plan\nagreed\n",
                "ok\n",
            ]
            assert stranger.probe(("read", top / "team" / "plan", "")) == [errno.EACCES]
            st = (top / "team" / "reply").stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (colleague.uid, 0o664)

            # Who was refused by the kernel never reached the key service: no Decrypt of
            # "public" by the colleague; the stranger's refusals were the key service's.
            key_user = Caller.from_ids(owner.uid, owner.gid)  # root only manages the key
            file_ids = {
                name: backing_of(m, top / name, key_user).read_bytes()[16:32].hex()
                for name in ("public", "private")
            }

            def decisions(r: dict[str, Any]) -> bool:
                return r["operation"] == "Decrypt" and r.get("encryption_context", {}).get(
                    "envfs:file"
                ) in set(file_ids.values())

            found = awaited_records(
                kms_env,
                arn,
                decisions,
                lambda rs: (
                    (stranger.uid, "AccessDeniedException")
                    in {(r["caller"]["uid"], r["outcome"]) for r in rs}
                ),
            )
            seen = {
                (r["caller"]["uid"], r["encryption_context"]["envfs:file"], r["outcome"])
                for r in found
            }
            assert (stranger.uid, file_ids["private"], "AccessDeniedException") in seen
            assert (colleague.uid, file_ids["private"], "Success") in seen
            assert not [s for s in seen if s[:2] == (colleague.uid, file_ids["public"])]
    finally:
        m.force_cleanup()


# --- 3. a hostile backing folder ----------------------------------------------------------


def test_acls_planted_in_the_backing_folder(vol: Mount) -> None:
    mnt = vol.mnt
    (mnt / "f").write_text("data\n")
    (mnt / "d").mkdir()
    (mnt / "honest").write_text("honest\n")
    assert sh("setfacl -m u:nobody:r honest", mnt).returncode == 0
    (mnt / "tricked").write_text("tricked\n")
    vol.umount()

    behind = {name: backing_of(vol, name) for name in ("f", "d", "honest", "tricked")}
    valid = os.getxattr(behind["honest"], "trusted.envfs.acl_access")
    os.setxattr(behind["f"], "trusted.envfs.acl_access", b"\x02\x00\x00\x00garbage!")
    os.setxattr(behind["d"], "trusted.envfs.acl_default", valid[:-3])
    # The user namespace's copy is not this (root-run) mount's: ignored, and not shown.
    os.setxattr(behind["tricked"], "user.envfs.acl_access", valid)
    vol.mount()

    assert acl_errno(mnt / "f") == errno.EIO
    assert (mnt / "f").read_text() == "data\n"  # root's own access needs no ACL
    made = sh("touch d/new", mnt)
    assert made.returncode != 0 and "Input/output error" in made.stderr
    assert os.listdir(behind["d"]) == [".envfs-dir"]  # nothing but the folder's id
    for name in ("f", "d"):
        assert warnings_naming(vol, behind[name]), vol.log_text()
    assert acl_errno(mnt / "tricked") == errno.ENODATA
    assert os.listxattr(mnt / "tricked") == []
    assert sh("getfacl -p honest", mnt).stdout.count("user:nobody:r--") == 1

    # Nobody reaches the private names through the mount: trusted.* is refused, and with
    # encrypted names user.envfs.acl_access is the user's own attribute, stored encrypted
    # under another name, never the ACL (the volume's names are encrypted, the default).
    with pytest.raises(OSError) as set_exc:
        os.setxattr(mnt / "honest", "trusted.envfs.acl_access", valid)
    assert set_exc.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as get_exc:
        os.getxattr(mnt / "honest", "trusted.envfs.acl_access")
    assert get_exc.value.errno == errno.EOPNOTSUPP
    before = os.getxattr(behind["honest"], "trusted.envfs.acl_access")
    os.setxattr(mnt / "tricked", "user.envfs.acl_access", valid)
    assert os.getxattr(mnt / "tricked", "user.envfs.acl_access") == valid
    assert os.getxattr(behind["tricked"], "user.envfs.acl_access") == valid  # the planted one
    assert acl_errno(mnt / "tricked") == errno.ENODATA  # still no ACL
    assert os.getxattr(behind["honest"], "trusted.envfs.acl_access") == before


# --- 4. a mount run by a user who is not root ---------------------------------------------


@pytest.fixture
def fuse_for_users() -> Iterator[None]:
    """/dev/fuse usable by every user, as on a stock Debian (mode 0666; some machines here
    have it 0600), for the test; its mode is put back afterwards."""
    before = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", before)


def test_a_users_own_mount_keeps_acls_in_the_user_namespace(
    users: dict[str, User],  # noqa: F811 - the fixture
    outside: Path,
    fuse_for_users: None,
) -> None:
    me = users["usr"]
    if me.sh(f"{ENVFS} --version").returncode != 0:
        pytest.skip(f"{me.name} cannot run {ENVFS}")
    assert me.sh("test -r /dev/fuse -a -w /dev/fuse").returncode == 0, "/dev/fuse"
    os.chown(outside, me.uid, me.gid)
    backing, mnt = outside / "backing", outside / "mnt"
    env = (
        f"export ENVFS_KMS_DIR={outside}/kms ENVFS_REGION=local-1"
        f" ENVFS_KMS_SOCKET={outside}/none.sock XDG_RUNTIME_DIR={outside}/run; "
    )
    setup = me.sh(
        env + f"cd {outside} && mkdir mnt run && "
        f"{ENVFS} kms init --key-creators-group {me.name} >/dev/null 2>&1 && "
        f"{ENVFS} kms create-key --description mine --query KeyMetadata.KeyId --output text"
        f" > key-id && {ENVFS} kms create-alias --alias-name alias/mine"
        f' --target-key-id "$(cat key-id)" && {ENVFS} init backing --key-id alias/mine'
    )
    assert setup.returncode == 0, setup.stderr
    try:
        mounted = me.sh(env + f"{ENVFS} mount {backing} {mnt} --log-file {outside}/log")
        assert mounted.returncode == 0, mounted.stderr
        assert is_mounted(mnt)
        used = me.sh(
            f"cd {mnt} && umask 077 && mkdir d && setfacl -d -m u:nobody:rx,g::rx d && "
            "echo mine > d/f && getfacl -p d/f && stat -c '%a' d/f && "
            "(getfattr -d -m - d/f 2>/dev/null || true) && "
            "python3 -c 'import os; print(sorted(os.listxattr(\"d/f\")))'"
        )
        assert used.returncode == 0, used.stderr
        assert (
            "user::rw-\nuser:nobody:r-x\t#effective:r--\ngroup::r-x\t#effective:r--\n"
            "mask::r--\nother::---\n\n640\n"
        ) in used.stdout
        assert "['system.posix_acl_access']" in used.stdout
        # d/f behind the mount (the user's key store is theirs alone: found by its place,
        # the one entry of the one folder, not by its encrypted name)
        [d_behind] = [p for p in backing.iterdir() if not p.name.startswith(".")]
        [f_behind] = [p for p in d_behind.iterdir() if not p.name.startswith(".")]
        assert os.listxattr(f_behind) == ["user.envfs.acl_access"]
        assert "POSIX ACLs on, kept in the backing folder as user.envfs.*" in (
            (outside / "log").read_text()
        )
        unmounted = me.sh(env + f"{ENVFS} umount {mnt}")
        assert unmounted.returncode == 0, unmounted.stderr
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
