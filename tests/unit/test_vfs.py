"""The filesystem core without a mount: key decisions for content changes, accepted keys.

``Vfs`` is built over a real embedded key service in a temporary folder; calls are made as
the FUSE adapter makes them, with callers the test chooses.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from envfs.errors import AccessDeniedException, IntegrityError, VolumeError
from envfs.files import fileformat
from envfs.files.inodes import ROOT_INODE
from envfs.files.keycache import DataKeyCache
from envfs.files.vfs import Vfs
from envfs.files.volume import Volume
from envfs.identity import Caller
from envfs.keys.embedded import EmbeddedKeyProvider
from envfs.keys.provider import DataKey
from envfs.kms.model import EncryptionContext
from envfs.kms.service import KeyService
from envfs.kms.store import KeyStore

ROOT = Caller(0, 0, frozenset({0}), "root", frozenset({"root"}))
USER = Caller(61002, 61002, frozenset({61002}))
STRANGER = Caller(61003, 61003, frozenset({61003}))


class SpyProvider(EmbeddedKeyProvider):
    """The embedded provider, recording which keys Decrypt was asked to use."""

    def __init__(self, service: KeyService) -> None:
        super().__init__(service)
        self.decrypts: list[tuple[str, int]] = []

    def _call(self, operation: str, params: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        if operation == "Decrypt":
            self.decrypts.append((str(params["KeyId"]), caller.uid))
        return super()._call(operation, params, caller)


class Setup:
    def __init__(self, root: Path) -> None:
        store = KeyStore.init(root / "kms" / "local-1", "local-1")
        self.service = KeyService(store)
        self.provider = SpyProvider(self.service)
        users = ["uid:0", f"uid:{USER.uid}"]
        self.key = self.new_key(users)
        self.other_key = self.new_key(users)  # a key the same users may use
        self.backing = root / "backing"
        self.volume = Volume.create(
            self.backing, self.key, self.provider, ROOT, format_version=1, encrypted_names=False
        )
        self.vfs = Vfs(self.volume, self.provider, chown_new=False)

    def new_key(self, users: list[str]) -> str:
        params = {"KeyAdministrators": ["uid:0"], "KeyUsers": users}
        arn: str = self.service.handle(ROOT, "CreateKey", params)["KeyMetadata"]["Arn"]
        return arn

    def write_file(self, name: bytes, data: bytes, caller: Caller = ROOT) -> int:
        fh, st = self.vfs.create(ROOT_INODE, name, 0o644, os.O_WRONLY, caller)
        self.vfs.write(fh, 0, data)
        self.vfs.release(fh)
        return st.ino

    def audit(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = self.service.handle(ROOT, "ListAuditRecords", {})["Records"]
        return records


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    yield s
    s.vfs.close()
    s.service.close()


# --- content changes are key decisions for the caller ------------------------------------


def test_truncating_an_open_file_is_decided_for_the_caller(setup: Setup) -> None:
    vfs = setup.vfs
    ino = setup.write_file(b"f", b"secret data" * 1000)
    held = vfs.open(ino, os.O_RDONLY, USER)  # a key user holds it open
    decisions = len(setup.provider.decrypts)
    with pytest.raises(AccessDeniedException):
        vfs.setattr(ino, STRANGER, size=5)  # Unix write permission, no right to the key
    with pytest.raises(AccessDeniedException):
        vfs.setattr(ino, STRANGER, size=1 << 20)  # nor upwards
    assert setup.provider.decrypts[decisions:] == [(setup.key, STRANGER.uid)] * 2
    assert vfs.read(held, 0, 1 << 20) == b"secret data" * 1000
    denied = [
        r
        for r in setup.audit()
        if r["caller"]["uid"] == STRANGER.uid and r["outcome"] == "AccessDeniedException"
    ]
    assert len(denied) == 2 and all("(truncate)" in json.dumps(r) for r in denied)
    vfs.setattr(ino, USER, size=6)  # a key user may
    assert vfs.read(held, 0, 100) == b"secret"
    vfs.release(held)


def test_truncating_a_closed_file_is_decided_for_the_caller(setup: Setup) -> None:
    ino = setup.write_file(b"f", b"x" * 100)
    with pytest.raises(AccessDeniedException):
        setup.vfs.setattr(ino, STRANGER, size=0)
    assert setup.vfs.getattr(ino).size == 100


def test_fallocate_is_decided_for_the_caller(setup: Setup) -> None:
    vfs = setup.vfs
    ino = setup.write_file(b"f", b"x" * 100)
    fh = vfs.open(ino, os.O_RDWR, USER)
    with pytest.raises(AccessDeniedException):
        vfs.fallocate(fh, 0, 0, 1 << 20, STRANGER)  # e.g. a descriptor passed to a stranger
    assert vfs.file_size(fh) == 100
    vfs.fallocate(fh, 0, 0, 1 << 20, USER)
    assert vfs.file_size(fh) == 1 << 20
    assert vfs.read(fh, 0, 101) == b"x" * 100 + b"\0"
    vfs.release(fh)


def test_o_trunc_is_the_open_s_decision(setup: Setup) -> None:
    ino = setup.write_file(b"f", b"x" * 100)
    with pytest.raises(AccessDeniedException):
        setup.vfs.open(ino, os.O_WRONLY | os.O_TRUNC, STRANGER)
    assert setup.vfs.getattr(ino).size == 100
    setup.vfs.release(setup.vfs.open(ino, os.O_WRONLY | os.O_TRUNC, USER))
    assert setup.vfs.getattr(ino).size == 0


# --- which keys may wrap a file's data key ------------------------------------------------


def plant(setup: Setup, name: str, key: str, data: bytes) -> bytes:
    """What someone who may write the backing folder and use ``key`` can do: a well-formed
    file of this volume (its encryption context) whose data key they keep."""
    file_id = os.urandom(16)
    context: EncryptionContext = setup.volume.file_context(file_id)
    data_key: DataKey = setup.provider.generate_data_key(key, context, USER, "planted")
    header = fileformat.FileHeader(
        file_id, setup.volume.block_shift, data_key.key_arn, data_key.wrapped
    )
    keys = fileformat.FileKeys.derive(data_key.plaintext, file_id)
    (setup.backing / name).write_bytes(fileformat.encrypt_file(header, keys, data))
    return data_key.plaintext


def test_a_header_naming_another_key_is_refused_without_asking(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    plant(setup, "planted", setup.other_key, b"bait")
    ino = setup.vfs.lookup(ROOT_INODE, b"planted").ino
    setup.vfs.verify_volume(USER)  # the volume file itself: a decision of its own
    asked = len(setup.provider.decrypts)
    with pytest.raises(
        IntegrityError, match=r"^the header names a key the volume does not accept$"
    ):
        setup.vfs.open(ino, os.O_RDWR, USER)
    assert len(setup.provider.decrypts) == asked  # the key service was not asked
    assert f"names key '{setup.other_key}', which the volume does not accept" in caplog.text
    assert str(setup.backing / "planted") in caplog.text
    assert IntegrityError("x").errno == errno.EIO


def test_a_volume_being_changed_to_another_key_accepts_both(setup: Setup) -> None:
    old = setup.write_file(b"old", b"under the old key")
    setup.volume.begin_key_change(setup.other_key, setup.provider, ROOT)
    reloaded = Volume.load(setup.backing)
    assert reloaded.key_arn == setup.other_key
    assert reloaded.previous_key_arns == [setup.key]
    reloaded.verify(setup.provider, ROOT)
    third = setup.new_key(["uid:0", f"uid:{USER.uid}"])
    plant(setup, "third", third, b"bait")
    vfs = Vfs(reloaded, setup.provider, chown_new=False)
    try:
        new = vfs.create(ROOT_INODE, b"new", 0o644, os.O_WRONLY, ROOT)
        vfs.write(new[0], 0, b"under the new key")
        vfs.release(new[0])
        for name, text in ((b"old", b"under the old key"), (b"new", b"under the new key")):
            fh = vfs.open(vfs.lookup(ROOT_INODE, name).ino, os.O_RDONLY, USER)
            assert vfs.read(fh, 0, 100) == text
            vfs.release(fh)
        raw = (setup.backing / "new").read_bytes()
        assert fileformat.FileHeader.parse(raw).key_arn == setup.other_key
        with pytest.raises(IntegrityError):
            vfs.open(vfs.lookup(ROOT_INODE, b"third").ino, os.O_RDONLY, USER)
    finally:
        vfs.close()
    assert old


def test_group_membership_lives_as_long_as_key_decisions(setup: Setup, tmp_path: Path) -> None:
    assert setup.vfs.access.callers.max_age == 0
    vfs = Vfs(setup.volume, setup.provider, chown_new=False, key_cache=DataKeyCache(7.5))
    try:
        assert vfs.access.callers.max_age == 7.5
    finally:
        vfs.close()


def test_the_accepted_keys_are_authenticated_by_the_volume_file(setup: Setup) -> None:
    path = setup.backing / ".envfs-volume.json"
    doc = json.loads(path.read_text())
    doc["previous_key_arns"] = [setup.other_key]  # someone adds a key they may use
    path.write_text(json.dumps(doc))
    forged = Volume.load(setup.backing)
    assert forged.accepts_key(setup.other_key)
    with pytest.raises(VolumeError, match=r"is not authentic: it was altered$"):
        forged.verify(setup.provider, USER)
    doc["previous_key_arns"] = [setup.other_key.replace("local-1", "eu-west-1")]
    path.write_text(json.dumps(doc))
    with pytest.raises(VolumeError, match=r"accepts keys of regions \['eu-west-1'\]"):
        Volume.load(setup.backing)


def test_leftovers_of_creates_are_removed_inside_only(setup: Setup, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".envfs-tmp-00000000000000aa").write_bytes(b"not ours")
    (setup.backing / "a" / "b").mkdir(parents=True)
    (setup.backing / "a" / "b" / ".envfs-tmp-00000000000000bb").write_bytes(b"half a header")
    (setup.backing / ".envfs-tmp-00000000000000cc").write_bytes(b"")
    (setup.backing / "a" / "link").symlink_to(outside)
    os.mkfifo(setup.backing / "a" / ".envfs-tmp-fifo")  # removed, never opened
    vfs = Vfs(setup.volume, setup.provider, chown_new=False)
    vfs.close()
    left = sorted(str(p.relative_to(setup.backing)) for p in setup.backing.rglob("*"))
    assert left == [".envfs-volume.json", "a", "a/b", "a/link"]
    assert (outside / ".envfs-tmp-00000000000000aa").read_bytes() == b"not ours"


def test_a_file_replaced_after_it_was_read_ahead_is_opened_anew(setup: Setup) -> None:
    vfs = setup.vfs
    for n in range(6):
        setup.write_file(b"f%d" % n, b"content %d" % n)
    ino = {n: vfs.lookup(ROOT_INODE, b"f%d" % n).ino for n in range(6)}
    for n in (0, 1):  # in name order: f2... are opened and asked for ahead
        vfs.release(vfs.open(ino[n], os.O_RDONLY, USER))
    os.replace(setup.backing / "f5", setup.backing / "f2")  # behind the mount's back
    replaced = vfs.lookup(ROOT_INODE, b"f2").ino
    fh = vfs.open(replaced, os.O_RDONLY, USER)
    assert vfs.read(fh, 0, 100) == b"content 5"  # not the descriptor held for the old f2
    vfs.release(fh)
    fh = vfs.open(ino[3], os.O_RDONLY, USER)  # the held descriptor is used for f3
    assert vfs.read(fh, 0, 100) == b"content 3"
    vfs.release(fh)


# --- POSIX ACLs ---------------------------------------------------------------------------

ACCESS, DEFAULT = b"system.posix_acl_access", b"system.posix_acl_default"
NOBODY = 65534


def acl_bytes(*entries: tuple[int, int, int]) -> bytes:
    """An ACL in the kernel's xattr form: (tag, permissions, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


U = 0xFFFFFFFF
# user::rw-, user:nobody:rw-, group::r--, mask::rw-, other::---
NAMED_RW = acl_bytes((0x01, 6, U), (0x02, 6, NOBODY), (0x04, 4, U), (0x10, 6, U), (0x20, 0, U))
# user::rwx, user:nobody:rwx, group::r-x, mask::rwx, other::r-x
DEFAULT_ACL = acl_bytes((0x01, 7, U), (0x02, 7, NOBODY), (0x04, 5, U), (0x10, 7, U), (0x20, 5, U))

PREFIXES = [
    b"user.envfs.",
    pytest.param(
        b"trusted.envfs.",
        marks=pytest.mark.skipif(os.geteuid() != 0, reason="trusted.* needs CAP_SYS_ADMIN"),
    ),
]


@pytest.fixture
def no_umask() -> Iterator[None]:
    old = os.umask(0)  # as the mount runs: modes are decided before the backing call
    yield
    os.umask(old)


@pytest.fixture(params=PREFIXES, ids=["user", "trusted"])
def acls(setup: Setup, no_umask: None, request: pytest.FixtureRequest) -> bytes:
    prefix: bytes = request.param
    setup.vfs.enable_acls(prefix)
    return prefix


def backing_mode(setup: Setup, name: str) -> int:
    return stat.S_IMODE(os.lstat(setup.backing / name).st_mode)


def test_acls_are_refused_until_the_kernel_enforces_them(setup: Setup) -> None:
    ino = setup.write_file(b"f", b"x")
    for call in (
        lambda: setup.vfs.getxattr(ino, ACCESS),
        lambda: setup.vfs.setxattr(ino, ACCESS, NAMED_RW, ROOT),
        lambda: setup.vfs.removexattr(ino, DEFAULT),
    ):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EOPNOTSUPP
    assert ACCESS not in setup.vfs.listxattr(ino)


def test_an_access_acl_sets_the_mode_and_a_chmod_its_mask(setup: Setup, acls: bytes) -> None:
    vfs = setup.vfs
    ino = setup.write_file(b"f", b"x")
    vfs.setattr(ino, None, mode=0o644)
    with pytest.raises(OSError) as none:
        vfs.getxattr(ino, ACCESS)
    assert none.value.errno == errno.ENODATA
    vfs.setxattr(ino, ACCESS, NAMED_RW, ROOT)
    assert backing_mode(setup, "f") == 0o660  # group bits: the mask
    assert os.getxattr(setup.backing / "f", acls + b"acl_access") == NAMED_RW
    assert vfs.getxattr(ino, ACCESS) == NAMED_RW
    assert vfs.listxattr(ino) == [ACCESS]  # the private name is not shown
    vfs.setattr(ino, None, mode=0o705)
    assert vfs.getxattr(ino, ACCESS) == acl_bytes(
        (0x01, 7, U), (0x02, 6, NOBODY), (0x04, 4, U), (0x10, 0, U), (0x20, 5, U)
    )
    # An ACL the mode says all of: the mode only, as ext4 keeps it.
    vfs.setxattr(ino, ACCESS, acl_bytes((0x01, 6, U), (0x04, 0, U), (0x20, 4, U)), ROOT)
    assert backing_mode(setup, "f") == 0o604
    assert acls + b"acl_access" not in [os.fsencode(n) for n in os.listxattr(setup.backing / "f")]
    with pytest.raises(OSError) as gone:
        vfs.getxattr(ino, ACCESS)
    assert gone.value.errno == errno.ENODATA
    vfs.removexattr(ino, ACCESS)  # none there: no error, as on ext4
    with pytest.raises(OSError) as invalid:  # the kernel sends none such; never stored
        vfs.setxattr(ino, ACCESS, NAMED_RW[:-1], ROOT)
    assert invalid.value.errno == errno.EINVAL
    assert os.listxattr(setup.backing / "f") == []


def test_setting_an_acl_clears_setgid_for_callers_outside_the_group(
    setup: Setup, acls: bytes
) -> None:
    vfs = setup.vfs
    ino = vfs.mkdir(ROOT_INODE, b"d", 0o775, ROOT).ino
    vfs.setattr(ino, None, mode=0o2775)
    vfs.setxattr(ino, ACCESS, DEFAULT_ACL, ROOT)  # root keeps it
    assert backing_mode(setup, "d") == 0o2775
    vfs.setxattr(ino, ACCESS, DEFAULT_ACL, USER)  # not in group 0 (the kernel let them: owner)
    assert backing_mode(setup, "d") == 0o775


def test_a_default_acl_is_inherited_and_the_umask_ignored(setup: Setup, acls: bytes) -> None:
    vfs = setup.vfs
    top = vfs.mkdir(ROOT_INODE, b"d", 0o777, ROOT, umask=0o022).ino
    assert backing_mode(setup, "d") == 0o755  # no default ACL: the umask applies
    with pytest.raises(OSError) as on_file:
        vfs.setxattr(setup.write_file(b"f", b"x"), DEFAULT, DEFAULT_ACL, ROOT)
    assert on_file.value.errno == errno.EACCES
    vfs.setxattr(top, DEFAULT, DEFAULT_ACL, ROOT)
    assert vfs.getxattr(top, DEFAULT) == DEFAULT_ACL
    assert vfs.listxattr(top) == [DEFAULT]

    sub = vfs.mkdir(top, b"sub", 0o777, ROOT, umask=0o077).ino
    fh, st = vfs.create(top, b"f", 0o100666, os.O_WRONLY, ROOT, umask=0o077)
    vfs.release(fh)
    assert (backing_mode(setup, "d/sub"), st.mode) == (0o775, stat.S_IFREG | 0o664)
    assert vfs.getxattr(sub, ACCESS) == DEFAULT_ACL
    assert vfs.getxattr(sub, DEFAULT) == DEFAULT_ACL  # passed on to folders
    assert vfs.getxattr(st.ino, ACCESS) == acl_bytes(
        (0x01, 6, U), (0x02, 7, NOBODY), (0x04, 5, U), (0x10, 6, U), (0x20, 4, U)
    )
    assert vfs.listxattr(st.ino) == [ACCESS]  # files get no default ACL
    if acls == b"trusted.envfs.":
        fifo = vfs.mknod(top, b"p", stat.S_IFIFO | 0o600, 0, ROOT, umask=0o077)
        assert fifo.mode == stat.S_IFIFO | 0o600
        assert vfs.getxattr(fifo.ino, ACCESS) == acl_bytes(
            (0x01, 6, U), (0x02, 7, NOBODY), (0x04, 5, U), (0x10, 0, U), (0x20, 0, U)
        )
    else:  # the user namespace holds xattrs of files and folders only: refused, not made
        with pytest.raises(PermissionError):
            vfs.mknod(top, b"p", stat.S_IFIFO | 0o600, 0, ROOT, umask=0o077)
        assert not (setup.backing / "d" / "p").exists()
    link = vfs.symlink(top, b"l", b"f", ROOT)
    assert stat.S_IMODE(link.mode) == 0o777  # symlinks inherit nothing
    vfs.removexattr(top, DEFAULT)
    vfs.mkdir(top, b"after", 0o777, ROOT, umask=0o027)
    assert backing_mode(setup, "d/after") == 0o750


def test_private_names_are_hidden_and_refused(setup: Setup, acls: bytes) -> None:
    vfs = setup.vfs
    ino = setup.write_file(b"f", b"x")
    vfs.setxattr(ino, b"user.kept", b"yes", ROOT)
    os.setxattr(setup.backing / "f", b"user.envfs.acl_access", NAMED_RW)
    os.setxattr(setup.backing / "f", b"user.envfs.other", b"reserved")
    for name in (b"user.envfs.acl_access", b"user.envfs.other", b"user.envfs.new"):
        with pytest.raises(OSError) as get:
            vfs.getxattr(ino, name)
        assert get.value.errno == errno.ENODATA, name
        for call in (
            lambda: vfs.setxattr(ino, name, b"x", ROOT),  # noqa: B023
            lambda: vfs.removexattr(ino, name),  # noqa: B023
        ):
            with pytest.raises(OSError) as refused:
                call()
            assert refused.value.errno == errno.EPERM, name
    listed = vfs.listxattr(ino)
    assert b"user.kept" in listed and not [n for n in listed if n.startswith(b"user.envfs.")]
    with pytest.raises(OSError) as trusted:
        vfs.getxattr(ino, b"trusted.envfs.acl_access")
    assert trusted.value.errno == errno.EOPNOTSUPP
    # The user namespace's copy is the mount's ACL only when the mount keeps them there.
    if acls == b"user.envfs.":
        assert ACCESS in listed
    else:
        assert ACCESS not in listed


MINIMAL_ACL = acl_bytes((0x01, 6, U), (0x04, 4, U), (0x20, 0, U))


@pytest.mark.parametrize(
    "planted",
    [
        b"garbage",
        acl_bytes((0x01, 6, U), (0x02, 6, NOBODY), (0x04, 4, U), (0x20, 0, U)),  # no mask
        acl_bytes((0x01, 0xFF, U), (0x04, 4, U), (0x10, 4, U), (0x20, 0, U)),
        MINIMAL_ACL,  # as an access ACL: says no more than the mode, never stored
    ],
    ids=["garbage", "no-mask", "bad-perms", "minimal"],
)
def test_a_malformed_acl_in_the_backing_folder_gives_eio(
    setup: Setup, acls: bytes, planted: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    vfs = setup.vfs
    ino = setup.write_file(b"f", b"x")
    top = vfs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    os.setxattr(setup.backing / "f", acls + b"acl_access", planted)
    with pytest.raises(OSError) as read:
        vfs.getxattr(ino, ACCESS)
    assert read.value.errno == errno.EIO
    assert vfs.listxattr(ino) == [ACCESS]  # listed: it is there, if unreadable
    where = os.fsencode(setup.backing / "f")
    name = os.fsdecode(acls)
    assert f"backing entry {where!r}: its {name}acl_access is not a valid ACL" in caplog.text
    if planted == MINIMAL_ACL:
        return  # a valid default ACL
    os.setxattr(setup.backing / "d", acls + b"acl_default", planted)
    for make in (
        lambda: vfs.create(top, b"new", 0o644, os.O_WRONLY, ROOT),
        lambda: vfs.mkdir(top, b"new", 0o755, ROOT),
    ):
        with pytest.raises(OSError) as create:
            make()
        assert create.value.errno == errno.EIO
    assert os.listdir(setup.backing / "d") == []
    where = os.fsencode(setup.backing / "d")
    assert f"backing entry {where!r}: its {name}acl_default is not a valid ACL" in caplog.text
