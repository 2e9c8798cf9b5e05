"""Hostile storage: whoever may write the backing folder attacks a real mount.

Every attack of ``docs/format.md``'s list of what is detected (the test checks the list and
this suite agree), the forged ends of files, headers naming keys the volume does not accept,
content changes by users the key policy refuses, group removal, backing folders swapped for
symlinks by another user, paths longer than PATH_MAX, and changes the disk cannot hold.
Each attack must end in EIO (or EACCES) with a WARNING naming the backing path, and the
mount must keep serving everything else.

Every test mounts for real (root and ``/dev/fuse``), and cleans up whatever happens: mounts
unmounted, tmpfs mounts removed, users deleted.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from envfs.files import fileformat
from envfs.files.journal import JOURNAL_DIR, Record
from tests.integration.conftest import Env, Mount, backing_of, golden_copy, is_mounted, live
from tests.integration.test_mount_security import (
    User,
    audit_records,
    awaited_records,
    create_key,
    envfs,
    flip,
    header_fields,
    kms,
    new_volume,
    read_errno,
    users,
    warnings_naming,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting for other users needs root"),
]
__all__ = ["users"]  # a fixture, used by name

HEADER = fileformat.HEADER_SIZE
BLOCK = 16384
STRIDE = BLOCK + 28
REPO = Path(__file__).resolve().parents[2]


def block_at(i: int) -> int:
    return HEADER + i * STRIDE


def blocks_of(raw: bytes) -> list[bytes]:
    return [raw[block_at(i) : block_at(i + 1)] for i in range((len(raw) - HEADER) // STRIDE + 1)]


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


# --- the attacks -----------------------------------------------------------------------------

# name -> (plaintext size of the victim, the attack on its backing file). ``ctx`` gives the
# backing folder, the other files' backing paths and the foreign files made beforehand.
Attack = Callable[[Path, dict[str, Path]], None]
THREE_AND_A_HALF = 3 * BLOCK + BLOCK // 2
THREE_WHOLE = 3 * BLOCK


def _swap_blocks(path: Path, ctx: dict[str, Path]) -> None:
    raw = path.read_bytes()
    parts = blocks_of(raw)
    path.write_bytes(raw[:HEADER] + parts[1] + parts[0] + b"".join(parts[2:]))


def _duplicate_block(path: Path, ctx: dict[str, Path]) -> None:
    raw = path.read_bytes()
    parts = blocks_of(raw)
    path.write_bytes(raw[:HEADER] + parts[0] + parts[0] + b"".join(parts[2:]))


def _splice(path: Path, ctx: dict[str, Path]) -> None:
    donor = ctx["donor"].read_bytes()
    patch(path, block_at(1), donor[block_at(1) : block_at(2)])


def _other_header(path: Path, ctx: dict[str, Path]) -> None:
    patch(path, 0, ctx["donor"].read_bytes()[:HEADER])


def _replace(name: str) -> Attack:
    return lambda path, ctx: shutil.copyfile(ctx[name], path)


def _append(path: Path, ctx: dict[str, Path]) -> None:
    with path.open("ab") as f:
        f.write(os.urandom(10))


def _replace_empty_final_block(path: Path, ctx: dict[str, Path]) -> None:
    size = path.stat().st_size
    os.truncate(path, size - 28)
    with path.open("ab") as f:
        f.write(os.urandom(28))


def _zero_block(path: Path, ctx: dict[str, Path]) -> None:
    patch(path, block_at(1), bytes(STRIDE))


def _plant_record(path: Path, ctx: dict[str, Path]) -> None:
    """A journal record under this file's id holding another file's block, over this file
    damaged where the record applies: found at mount, it must not be applied."""
    file_id = fileformat.FileHeader.parse(path.read_bytes()).file_id
    donor = ctx["donor"].read_bytes()[block_at(1) : block_at(2)]
    record = Record(file_id, 14, path.stat().st_size, None, ((1, donor),))
    (path.parent / JOURNAL_DIR).mkdir(exist_ok=True)
    (path.parent / JOURNAL_DIR / file_id.hex()).write_bytes(b"".join(record.encode()))
    flip(path, block_at(1) + 100)


# Rows of docs/format.md's "What is detected" table, by their first words, and the attacks
# of this suite for each. A row without an attack here fails the suite.
ATTACKS: dict[str, tuple[str, int, Attack]] = {
    "header-bit": ("any flipped bit in the header", 100, lambda p, c: flip(p, 200)),
    "header-key-arn": (
        "any flipped bit in the header",
        100,
        lambda p, c: flip(p, header_fields(p)[0] + 20),
    ),
    "header-mac": ("any flipped bit in the header", 100, lambda p, c: flip(p, 500)),
    "block-bit": ("any flipped bit in a block", THREE_AND_A_HALF, lambda p, c: flip(p, 20000)),
    "block-nonce": ("any flipped bit in a block", THREE_AND_A_HALF, lambda p, c: flip(p, 515)),
    "blocks-reordered": ("blocks reordered or duplicated", THREE_AND_A_HALF, _swap_blocks),
    "block-duplicated": ("blocks reordered or duplicated", THREE_AND_A_HALF, _duplicate_block),
    "block-spliced": ("a block spliced in from another file", THREE_AND_A_HALF, _splice),
    "header-swapped": ("a header swapped in from another file", THREE_AND_A_HALF, _other_header),
    "cut-at-boundary": (
        "truncation at a block boundary",
        THREE_AND_A_HALF,
        lambda p, c: os.truncate(p, block_at(2)),
    ),
    "cut-to-header": ("truncation at a block boundary", 100, lambda p, c: os.truncate(p, HEADER)),
    "cut-inside-block": (
        "truncation or extension inside a block",
        THREE_AND_A_HALF,
        lambda p, c: os.truncate(p, p.stat().st_size - 5),
    ),
    "appended": ("truncation or extension inside a block", THREE_AND_A_HALF, _append),
    "empty-block-replaced": (
        "the empty final block replaced",
        THREE_WHOLE,
        _replace_empty_final_block,
    ),
    "empty-block-tag-flipped": (
        "the empty final block replaced",
        THREE_WHOLE,
        lambda p, c: flip(p, p.stat().st_size - 1),
    ),
    "cut-to-look-whole": (
        "a file cut to look like whole blocks",
        THREE_AND_A_HALF,
        lambda p, c: os.truncate(p, block_at(2) + 28),
    ),
    "cut-to-540": (
        "a file cut to look like whole blocks",
        THREE_AND_A_HALF,
        lambda p, c: os.truncate(p, HEADER + 28),
    ),
    "zeroed-block": ("a whole block zeroed", THREE_AND_A_HALF, _zero_block),
    "foreign-volume": ("a header from another volume", 100, _replace("foreign-volume")),
    "foreign-key": ("a header naming a key", 100, _replace("planted")),
    "version-3": (
        "unknown version, cipher suite, flags",
        100,
        lambda p, c: patch(p, 8, b"\0\x03"),
    ),
    "version-1": (  # known, but not this (version 2) volume's
        "unknown version, cipher suite, flags",
        100,
        lambda p, c: patch(p, 8, b"\0\x01"),
    ),
    "unknown-flag": (
        "unknown version, cipher suite, flags",
        100,
        lambda p, c: patch(p, 12, b"\0\0\0\x01"),
    ),
    "plaintext": ("not an envfs file", 100, lambda p, c: p.write_text("PLAINTEXT dropped in\n")),
    "zero-bytes": ("not an envfs file", 100, lambda p, c: p.write_bytes(b"")),
    "journal-record": ("a journal record planted", THREE_AND_A_HALF, _plant_record),
}


def detected_rows() -> list[str]:
    """The first cells of the rows of docs/format.md's 'What is detected' table."""
    text = (REPO / "docs" / "format.md").read_text()
    section = text.split("## What is detected", 1)[1].split("\n## ", 1)[0]
    table = section.split("Not detected", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    return [row.split("|")[1].strip() for row in rows[1:]]


def test_every_detected_attack_of_the_spec_is_in_this_suite() -> None:
    rows = detected_rows()
    assert len(rows) >= 12
    covered = {prefix for prefix, _, _ in ATTACKS.values()}
    missing = [row for row in rows if not any(row.startswith(p) for p in covered)]
    assert not missing, f"docs/format.md lists attacks this suite does not try: {missing}"
    stale = [p for p in covered if not any(row.startswith(p) for row in rows)]
    assert not stale, f"attacks named after no row of docs/format.md: {stale}"


def plant_foreign_key_file(env: Env, volume_backing: Path, key_alias: str, dest: Path) -> None:
    """What someone who may write the backing folder and use another key can do: a file
    with this volume's encryption context, wrapped under their key, data key kept."""
    volume = json.loads((volume_backing / ".envfs-volume.json").read_text())
    file_id = os.urandom(16)
    out = json.loads(
        envfs(
            env,
            "kms",
            "generate-data-key",
            "--embedded",
            "--key-id",
            f"alias/{key_alias}",
            "--key-spec",
            "AES_256",
            "--encryption-context",
            f"envfs:volume={volume['volume_id']},envfs:file={file_id.hex()}",
        )[1]
    )
    data_key = base64.b64decode(out["Plaintext"])
    version = volume["format_version"]  # the volume's: a file of another is refused first
    header = fileformat.FileHeader(
        file_id,
        volume["block_shift"],
        out["KeyId"],
        base64.b64decode(out["CiphertextBlob"]),
        version=version,
    )
    keys = fileformat.FileKeys.derive(data_key, file_id, version)
    dest.write_bytes(fileformat.encrypt_file(header, keys, b"bait: whoever appends here is read\n"))


def test_every_attack_gives_eio_and_a_warning_and_the_rest_is_served(kms_env: Env) -> None:
    create_key(kms_env, "vol")
    create_key(kms_env, "other")  # a key root may use too: the planter's
    with live(new_volume(kms_env, "foreign", "vol")) as other:
        (other.mnt / "f").write_bytes(b"a file of another volume under the same key\n")
    m = new_volume(kms_env, "vol")
    contents = {name: os.urandom(size) for name, (_, size, _) in ATTACKS.items()}
    contents |= {"good": b"good\n", "donor": os.urandom(THREE_AND_A_HALF), "empty": b""}
    with live(m):
        for name, data in contents.items():
            (m.mnt / name).write_bytes(data)
        with (m.mnt / "sparse").open("wb") as sparse:  # a file with holes
            sparse.write(b"start")
            sparse.truncate(64 << 20)
    b = m.backing
    behind = {name: backing_of(m, name) for name in [*contents, "sparse", "planted"]}
    ctx = {
        "donor": behind["donor"],
        "foreign-volume": backing_of(other, "f"),
        "planted": behind["planted"],
    }
    plant_foreign_key_file(kms_env, b, "other", behind["planted"])
    for name, (_, _, attack) in ATTACKS.items():
        attack(behind[name], ctx)
    patch(behind["sparse"], block_at(100) + 7, b"\1")  # a hole with a byte set

    with live(m):
        outcomes = {name: read_errno(m.mnt / name) for name in [*ATTACKS, "planted"]}
        wrong = {name: got for name, got in outcomes.items() if got[1] != errno.EIO}
        assert not wrong, f"expected EIO at open or read, got {wrong}"
        assert (m.mnt / "good").read_bytes() == b"good\n"  # still served after all that
        silent = [n for n in [*ATTACKS, "planted"] if not warnings_naming(m, behind[n])]
        assert not silent, f"no WARNING naming the backing path of {silent}:\n{m.log_text()}"
        for name in ("foreign-key", "planted"):
            assert "which the volume does not accept" in warnings_naming(m, behind[name])[0]
        # The planted record was looked at, refused, and changed nothing.
        assert "does not repair it: ignored" in warnings_naming(m, behind["journal-record"])[0]
        # A forged end: nothing is served, not even a first byte (an empty file: at open).
        for name in ("empty-block-replaced", "cut-to-look-whole", "appended"):
            fd = os.open(m.mnt / name, os.O_RDONLY)
            try:
                with pytest.raises(OSError) as info:
                    os.read(fd, 1)
                assert info.value.errno == errno.EIO
            finally:
                os.close(fd)
        with pytest.raises(OSError) as info:
            os.open(m.mnt / "cut-to-540", os.O_RDONLY)
        assert info.value.errno == errno.EIO
        # Nor does a write make a forged end the writer's.
        with pytest.raises(OSError) as info, (m.mnt / "cut-to-look-whole").open("ab") as f:
            f.write(b"appended by the victim")
            f.flush()
        assert info.value.errno == errno.EIO
        # The sparse file: its holes read as zeros, the damaged one fails, the rest is there.
        with (m.mnt / "sparse").open("rb") as f:
            assert f.read(5) == b"start"
            f.seek(99 * BLOCK)
            assert f.read(BLOCK) == bytes(BLOCK)
            with pytest.raises(OSError) as info:
                f.seek(100 * BLOCK)
                f.read(10)
            assert info.value.errno == errno.EIO
        assert warnings_naming(m, behind["sparse"])
        for name in ("good", "donor", "empty"):
            assert (m.mnt / name).read_bytes() == contents[name]
        (m.mnt / "after").write_bytes(b"still writable\n")
        assert (m.mnt / "after").read_bytes() == b"still writable\n"
    # Nobody was asked to unwrap under the planter's key on the victim's behalf.
    arn = kms(kms_env, "describe-key", "--key-id", "alias/other")["KeyMetadata"]["Arn"]
    assert not [r for r in audit_records(kms_env, arn) if r["operation"] == "Decrypt"]


# --- content changes by users the key policy refuses ----------------------------------------

# Run as root, then as the stranger: opens the file as root (a key user here), hands the
# descriptor over by changing uid, and tries to change the content through it.
DELEGATE = r"""
import json, os, sys
path, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
out = []
for change in (lambda: os.ftruncate(fd, 3), lambda: os.ftruncate(fd, 1 << 20),
               lambda: os.posix_fallocate(fd, 0, 1 << 20)):
    try:
        change()
        out.append("ok")
    except OSError as e:
        out.append(e.errno)
print(json.dumps(out))
"""

TRUNCATE_BY_PATH = r"""
import os, sys
for size in (5, 1 << 20):
    try:
        os.truncate(sys.argv[1], size)
    except OSError as e:
        print(e.errno)
"""

HOLD = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
print("open", flush=True)
sys.stdin.readline()
print(os.pread(fd, 100, 0).decode(), flush=True)
"""


@contextlib.contextmanager
def shared_mount(env: Env, name: str, *key_args: str) -> Iterator[Mount]:
    """A root-run ``--allow-other`` volume under a new key with ``key_args``, in a folder
    every user can reach, mounted for the block."""
    create_key(env, name, *key_args)
    outside = Path(tempfile.mkdtemp(prefix="envfs-hostile-", dir="/tmp"))
    try:
        outside.chmod(0o755)
        backing = outside / "backing"
        envfs(env, "init", str(backing), "--key-id", f"alias/{name}")
        (outside / "mnt").mkdir()
        m = Mount(env, backing, outside / "mnt", env.root / f"{name}.log", ("--allow-other",))
        with live(m):
            m.mnt.chmod(0o755)
            yield m
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_truncate_and_fallocate_are_decided_for_the_caller_while_the_file_is_open(
    kms_env: Env, users: dict[str, User]
) -> None:
    usr, stranger = users["usr"], users["str"]
    with shared_mount(kms_env, "shared", "--key-users", "uid:0", f"user:{usr.name}") as m:
        doc = m.mnt / "doc"
        doc.write_text("the key user's text\n")
        doc.chmod(0o666)  # Unix mode bits let everyone write
        arn = kms(kms_env, "describe-key", "--key-id", "alias/shared")["KeyMetadata"]["Arn"]
        holder = subprocess.Popen(
            usr.cmd("/usr/bin/python3", "-I", "-c", HOLD, str(doc)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        try:
            assert holder.stdout is not None and holder.stdin is not None
            assert holder.stdout.readline() == "open\n"
            # truncate(2) by path (no open), down and up; GNU truncate (open, then ftruncate).
            script = TRUNCATE_BY_PATH
            result = subprocess.run(
                stranger.cmd("/usr/bin/python3", "-I", "-c", script, str(doc)),
                capture_output=True, text=True, check=True, cwd="/", timeout=30,
            )  # fmt: skip
            assert result.stdout.split() == [str(errno.EACCES)] * 2
            result = stranger.sh(f"truncate -s 0 {doc}")
            assert result.returncode == 1
            assert "Permission denied" in result.stderr, result.stderr
            delegated = subprocess.run(
                ["/usr/bin/python3", "-I", "-c", DELEGATE, str(doc), str(stranger.uid),
                 str(stranger.gid)],
                capture_output=True, text=True, check=True, cwd="/", timeout=30,
            )  # fmt: skip
            assert json.loads(delegated.stdout) == [errno.EACCES] * 3
            holder.stdin.write("read\n")
            holder.stdin.flush()
            assert holder.stdout.readline() == "the key user's text\n"
            assert holder.wait(timeout=30) == 0
        finally:
            if holder.poll() is None:
                holder.kill()
            holder.communicate()
        assert doc.read_text() == "the key user's text\n"
        assert usr.sh(f"truncate -s 8 {doc} && cat {doc}").stdout == "the key "
        doc_behind = backing_of(m, doc)
        note = f"{doc_behind} (truncate)"
        denied = awaited_records(
            kms_env,
            arn,
            lambda r: (
                r["caller"]["uid"] == stranger.uid
                and r["outcome"] == "AccessDeniedException"
                and r.get("request", {}).get("AuditNote", "").startswith(str(doc_behind))
            ),
            lambda rs: len(rs) >= 6,
        )
        assert len(denied) == 6, denied
        notes = [r["request"]["AuditNote"] for r in denied]
        assert notes.count(note) == 4  # two truncate(2), two ftruncate(2)
        assert notes.count(f"{doc_behind} (fallocate)") == 1


def test_removal_from_a_group_bites_at_the_next_open(kms_env: Env, users: dict[str, User]) -> None:
    usr = users["usr"]
    group = f"envfs-t-g-{usr.name[-6:]}"
    subprocess.run(["groupadd", group], check=True)
    try:
        subprocess.run(["gpasswd", "-a", usr.name, group], check=True, capture_output=True)
        with shared_mount(kms_env, "grp", "--key-users", "uid:0", f"group:{group}") as m:
            (m.mnt / "doc").write_text("for the group\n")
            (m.mnt / "doc").chmod(0o644)
            assert usr.sh(f"cat {m.mnt / 'doc'}").stdout == "for the group\n"
            subprocess.run(["gpasswd", "-d", usr.name, group], check=True, capture_output=True)
            refused = usr.sh(f"cat {m.mnt / 'doc'}")
            assert refused.stderr == f"cat: {m.mnt / 'doc'}: Permission denied\n"
            subprocess.run(["gpasswd", "-a", usr.name, group], check=True, capture_output=True)
            assert usr.sh(f"cat {m.mnt / 'doc'}").stdout == "for the group\n"
    finally:
        subprocess.run(["groupdel", group], check=False)


# --- the backing folder changed under the mount by another user ------------------------------


def tree_state(root: Path) -> dict[str, tuple[int, int, int, int, bytes]]:
    """Everything about a folder an escape could change: names, modes, owners, contents."""
    state = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        state[str(path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, content)
    return state


SWAPPER = r"""
import os, sys, time
sub, moved, target = sys.argv[1], sys.argv[2], sys.argv[3]
end = time.monotonic() + float(sys.argv[4])
while time.monotonic() < end:
    try:
        os.rename(sub, moved)
        os.symlink(target, sub)
        os.unlink(sub)
        os.rename(moved, sub)
    except OSError:
        pass
"""


def test_folders_swapped_for_symlinks_lead_nowhere_outside(
    kms_env: Env, users: dict[str, User]
) -> None:
    attacker = users["str"]
    target = Path(tempfile.mkdtemp(prefix="envfs-target-", dir="/tmp"))
    try:
        target.chmod(0o755)
        (target / "victim").write_text("root's file outside the backing folder\n")
        (target / "victim").chmod(0o600)
        (target / "dir").mkdir()
        (target / ".envfs-tmp-0123456789abcdef").write_text("not a leftover of ours\n")
        before = tree_state(target)
        with shared_mount(kms_env, "swap", "--key-users", "uid:0") as m:
            sub = m.mnt / "sub"
            sub.mkdir()
            (sub / "victim").write_text("inside\n")
            (sub / "dir").mkdir()
            b_sub = backing_of(m, sub)
            os.chown(b_sub, attacker.uid, attacker.gid)  # the attacker may write this folder
            m.backing.chmod(0o777)  # ... and the backing folder itself (a shared disk)

            # The operations below name entries relative to a descriptor of the folder in
            # the mount, opened before the swap: the kernel asks the daemon about that very
            # folder, never looks "sub" up again. (A process that walks a path through the
            # mount follows a symlink the attacker planted, as on any shared folder: that is
            # the process's doing, not the daemon's.)
            at = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)

            def every_operation(tag: str) -> None:
                v, proc = "victim", f"/proc/self/fd/{at}/victim"
                operations: list[Callable[[], object]] = [
                    lambda: os.close(os.open(f"new{tag}", os.O_CREAT | os.O_WRONLY, dir_fd=at)),
                    lambda: os.close(os.open(v, os.O_RDWR | os.O_TRUNC, dir_fd=at)),
                    lambda: os.chmod(v, 0o666, dir_fd=at),
                    lambda: os.chown(v, attacker.uid, attacker.gid, dir_fd=at),
                    lambda: os.utime(v, (0, 0), dir_fd=at),
                    lambda: os.truncate(proc, 0),
                    lambda: os.setxattr(proc, "user.x", b"1"),
                    lambda: os.unlink(v, dir_fd=at),
                    lambda: os.mkdir(f"made{tag}", dir_fd=at),
                    lambda: os.rmdir("dir", dir_fd=at),
                    lambda: os.symlink("/etc/shadow", f"link{tag}", dir_fd=at),
                    lambda: os.mkfifo(f"fifo{tag}", dir_fd=at),
                    lambda: os.rename(v, "renamed", src_dir_fd=at, dst_dir_fd=at),
                    lambda: os.link(v, f"hard{tag}", src_dir_fd=at, dst_dir_fd=at),
                    lambda: os.listdir(at),
                ]
                for op in operations:
                    with contextlib.suppress(OSError):
                        op()

            try:
                # Swapped once: every operation through the mount fails, nothing outside moves.
                assert attacker.sh(f"mv {b_sub} {m.backing}/moved && ln -s {target} {b_sub}")\
                    .returncode == 0  # fmt: skip
                every_operation("")
                assert tree_state(target) == before
                attacker.sh(f"rm {b_sub} && mv {m.backing}/moved {b_sub}")

                # Swapped back and forth as fast as the attacker can, while root works.
                swapper = subprocess.Popen(
                    attacker.cmd("/usr/bin/python3", "-I", "-c", SWAPPER, str(b_sub),
                                 str(m.backing / "moved"), str(target), "3"),
                    cwd="/",
                )  # fmt: skip
                try:
                    deadline = time.monotonic() + 3
                    i = 0
                    while time.monotonic() < deadline:
                        i += 1
                        every_operation(str(i))
                finally:
                    swapper.wait(timeout=30)
            finally:
                os.close(at)
            assert tree_state(target) == before
            assert is_mounted(m.mnt)
            (m.mnt / "still").write_text("served\n")
            assert (m.mnt / "still").read_text() == "served\n"
            # A mount removes leftovers of interrupted creates: none outside, through a
            # symlink.
            m.umount()
            attacker.sh(f"rm -rf {b_sub}; ln -s {target} {b_sub}")
            m.mount()
            assert (m.mnt / "still").read_text() == "served\n"
        assert tree_state(target) == before
    finally:
        shutil.rmtree(target, ignore_errors=True)


# --- paths longer than PATH_MAX ---------------------------------------------------------------


def test_paths_far_longer_than_path_max(vol: Mount) -> None:
    names = [f"{i:02d}".encode() + b"n" * 198 for i in range(42)]  # 42 x 200 bytes, 8.4 KB
    fd = os.open(vol.mnt, os.O_RDONLY | os.O_DIRECTORY)
    fds = [fd]
    try:
        for name in names:
            os.mkdir(name, 0o755, dir_fd=fds[-1])
            fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        bottom = fds[-1]
        data = os.urandom(3 * BLOCK + 17)
        out = os.open(b"file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=bottom)
        os.write(out, data)
        os.close(out)
        os.rename(b"file", b"renamed", src_dir_fd=bottom, dst_dir_fd=bottom)
        os.symlink(b"renamed", b"link", dir_fd=bottom)
        os.setxattr(f"/proc/self/fd/{bottom}", "user.deep", b"yes")
        entries = sorted(os.listdir(bottom))
        assert entries == ["link", "renamed"]
    finally:
        for f in fds:
            os.close(f)
    # The backing folder holds it too, deeper than PATH_MAX; a fresh mount reads it back.
    vol.remount()
    fd = os.open(vol.mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            step = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = step
        got = os.open(b"link", os.O_RDONLY, dir_fd=fd)
        try:
            assert os.read(got, len(data) + 1) == data
        finally:
            os.close(got)
        assert os.getxattr(f"/proc/self/fd/{fd}", "user.deep") == b"yes"
        # Removing it all again, from the bottom up.
        os.unlink(b"link", dir_fd=fd)
        os.unlink(b"renamed", dir_fd=fd)
    finally:
        os.close(fd)
    shutil.rmtree(vol.mnt / names[0].decode())
    assert os.listdir(vol.mnt) == []
    assert "WARNING" not in vol.log_text()


# --- changes the disk cannot hold (on a small tmpfs, never on the machine's disk) -------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted afterwards whatever happens."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(where)],
                   check=True)  # fmt: skip
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def used(path: Path) -> int:
    sv = os.statvfs(path)
    return (sv.f_blocks - sv.f_bfree) * sv.f_frsize


def test_changes_the_disk_cannot_hold_fail_fast_and_change_nothing(
    kms_env: Env, small_disk: Path
) -> None:
    create_key(kms_env, "vol")
    backing, mnt = small_disk / "backing", kms_env.root / "small-mnt"
    mnt.mkdir()
    envfs(kms_env, "init", str(backing), "--key-id", "alias/vol")
    m = Mount(kms_env, backing, mnt, kms_env.root / "small.log")
    with live(m):
        f = mnt / "f"
        f.write_bytes(b"precious\n" * 1000)
        (mnt / "other").write_text("another file\n")
        f_behind = backing_of(m, f)
        before = f_behind.read_bytes()

        def unchanged() -> None:
            assert f_behind.read_bytes() == before
            assert f.read_bytes() == b"precious\n" * 1000
            assert f.stat().st_size == 9000

        # Past the largest file: EFBIG, at once.
        for size in (2**63 - 1, 2**63 - 2**40):
            with pytest.raises(OSError) as info:
                os.truncate(f, size)
            assert info.value.errno == errno.EFBIG
            unchanged()
        # More data than the disk holds: ENOSPC, and the file as it was. Each change is one
        # FUSE request (within one page of the file, from one page of memory): a write(2)
        # the kernel splits into several may succeed in part, as on any disk.
        holey = mnt / "holey"
        with holey.open("wb") as h:
            h.truncate(8 << 20)
        holey_behind = backing_of(m, holey)
        holey_before = holey_behind.read_bytes()
        page = mmap.mmap(-1, 4096)
        page.write(os.urandom(4096))
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(filler, 0, free)  # the disk is full
            fd = os.open(f, os.O_RDWR)
            try:
                with pytest.raises(OSError) as info:
                    os.pwrite(fd, memoryview(page)[:3000], 9000)  # past the end
                assert info.value.errno == errno.ENOSPC
                unchanged()
                with pytest.raises(OSError) as info:
                    os.posix_fallocate(fd, 0, 64 << 20)
                assert info.value.errno == errno.ENOSPC
                unchanged()
            finally:
                os.close(fd)
            with holey.open("r+b", buffering=0) as h:
                with pytest.raises(OSError) as info:
                    h.seek(4 << 20)
                    h.write(memoryview(page)[:3000])  # into a hole
                assert info.value.errno == errno.ENOSPC
            assert holey_behind.read_bytes() == holey_before
        finally:
            os.close(filler)
            os.unlink(small_disk / "filler")
            page.close()
        # Large gaps cost no space: they are holes, which read as zeros.
        start = used(small_disk)
        for size in (1 << 30, 999_999_999_999_999):
            os.truncate(mnt / "big", 0) if (mnt / "big").exists() else (mnt / "big").touch()
            os.truncate(mnt / "big", size)
            assert (mnt / "big").stat().st_size == size
            with (mnt / "big").open("rb") as big:
                big.seek(size // 2)
                assert big.read(100) == bytes(100)
                big.seek(size - 10)
                assert big.read(100) == bytes(10)
            assert used(small_disk) - start < 1 << 20
        with (mnt / "big").open("r+b") as big:
            big.seek(123_456_789_012)
            big.write(b"far away")
        with (mnt / "big").open("rb") as big:
            big.seek(123_456_789_010)
            assert big.read(12) == b"\0\0far away\0\0"
        assert (mnt / "other").read_text() == "another file\n"
        unchanged()
    assert not re.search(r"ERROR|Traceback", m.log_text()), m.log_text()


# --- the golden broken volume -----------------------------------------------------------------

BROKEN = REPO / "tests" / "golden" / "broken-v1"


def test_the_golden_broken_volume_gives_what_it_says(tmp_path: Path) -> None:
    expected = json.loads((BROKEN / "expected.json").read_text())
    copy, env = golden_copy(BROKEN, tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(env, copy / "backing", mnt, tmp_path / "broken.log")
    with live(m):
        for rel, want in expected["broken"].items():
            where, err = read_errno(mnt / rel)
            assert (where, errno.errorcode.get(err)) == (want["fails_at"], want["errno"]), rel
            lines = warnings_naming(m, copy / "backing" / rel)
            assert any(want["warning"] in line for line in lines), (rel, lines)
            for good, facts in expected["good"].items():  # served after every failure
                data = (mnt / good).read_bytes()
                assert hashlib.sha256(data).hexdigest() == facts["sha256"], good
        names = {str(p.relative_to(mnt)) for p in mnt.rglob("*") if not p.is_dir()}
        assert names == {*expected["good"], *expected["broken"]}
