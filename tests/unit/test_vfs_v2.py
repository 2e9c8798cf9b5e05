"""Files of a format version 2 volume through the filesystem core (no mount): created,
written, read and reopened as version 2; a header of the other version refused; a header
rewrapped with the key service's ReEncrypt alone still read; and what the key service
refuses in a header whose key ARN or wrapped key was changed (docs/format.md, *Version 2*).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from envfs.crypto import hkdf, hmac_sha256
from envfs.errors import IncorrectKeyException, IntegrityError, InvalidCiphertextException
from envfs.files import fileformat
from envfs.files.fileformat import HEADER_SIZE, MAC_OFFSET, FileHeader, FileKeys
from envfs.files.inodes import ROOT_INODE
from envfs.files.vfs import Vfs
from envfs.files.volume import Volume
from envfs.keys.embedded import EmbeddedKeyProvider
from envfs.kms.service import KeyService
from envfs.kms.store import KeyStore
from tests.unit.fakekeys import KEY_USER, ROOT, FakeKeyProvider
from tests.unit.test_core_vfs import read_file, write_file

MIB = 1 << 20


@contextlib.contextmanager
def opened(volume: Volume, provider: FakeKeyProvider | EmbeddedKeyProvider) -> Iterator[Vfs]:
    vfs = Vfs(volume, provider, chown_new=False)
    try:
        yield vfs
    finally:
        vfs.close()


def data_key_of(
    raw: bytes, volume: Volume, provider: FakeKeyProvider | EmbeddedKeyProvider
) -> bytes:
    """The data key of a backing file, unwrapped as its reader would (for checking only)."""
    header = FileHeader.parse(raw)
    context = volume.file_context(header.file_id)
    return provider.decrypt(header.wrapped_key, header.key_arn, context, ROOT, "test")


def plant(volume: Volume, provider: FakeKeyProvider, name: str, data: bytes, version: int) -> None:
    """A well-formed file of this volume (its key, its context) in format ``version``."""
    file_id = os.urandom(16)
    key = provider.generate_data_key(volume.key_arn, volume.file_context(file_id), ROOT, "plant")
    header = FileHeader(file_id, volume.block_shift, key.key_arn, key.wrapped, version=version)
    keys = FileKeys.derive(key.plaintext, file_id, version)
    (volume.backing / name).write_bytes(fileformat.encrypt_file(header, keys, data))


# --- a version 2 volume makes and reads version 2 files ----------------------------------


def test_a_v2_volume_creates_writes_and_reopens_v2_files(
    vfs_v2: Vfs, volume_v2: Volume, fake_keys: FakeKeyProvider
) -> None:
    data = os.urandom(3 * volume_v2.block_size + 100)
    ino = write_file(vfs_v2, b"f", data)
    raw = (volume_v2.backing / "f").read_bytes()
    header = FileHeader.parse(raw)
    assert (raw[8:10], header.version) == (b"\x00\x02", 2)
    data_key = data_key_of(raw, volume_v2, fake_keys)
    header_key = hkdf(data_key, b"envfs v2 header", salt=header.file_id)
    assert raw[MAC_OFFSET:HEADER_SIZE] == hmac_sha256(header_key, raw[:33])
    keys = FileKeys.derive(data_key, header.file_id, 2)
    assert fileformat.decrypt_file(raw, keys) == data
    assert read_file(vfs_v2, ino) == data  # reopened: the header is read again
    # Written again in the middle, past the end, truncated: still version 2 and readable.
    fh = vfs_v2.open(ino, os.O_RDWR, KEY_USER)
    vfs_v2.write(fh, 10, b"middle")
    vfs_v2.write(fh, len(data) + 5, b"end")
    vfs_v2.release(fh)
    vfs_v2.setattr(ino, KEY_USER, size=len(data) + 7)
    expected = data[:10] + b"middle" + data[16:] + bytes(5) + b"en"
    assert read_file(vfs_v2, ino) == expected
    raw = (volume_v2.backing / "f").read_bytes()
    assert fileformat.decrypt_file(raw, keys) == expected
    assert raw[:HEADER_SIZE] == header.encode(keys)  # the same header throughout


def test_a_large_gap_in_a_v2_file_sets_the_sparse_flag_under_the_v2_mac(
    vfs_v2: Vfs, volume_v2: Volume, fake_keys: FakeKeyProvider
) -> None:
    ino = write_file(vfs_v2, b"holey", b"start")
    vfs_v2.setattr(ino, KEY_USER, size=4 * MIB)
    raw = (volume_v2.backing / "holey").read_bytes()
    header = FileHeader.parse(raw)
    assert (header.version, header.sparse) == (2, True)
    keys = FileKeys.derive(data_key_of(raw, volume_v2, fake_keys), header.file_id, 2)
    header.verify(raw, keys)
    assert read_file(vfs_v2, ino) == b"start" + bytes(4 * MIB - 5)


def test_a_v1_volume_still_makes_v1_files(
    vfs: Vfs, volume: Volume, fake_keys: FakeKeyProvider
) -> None:
    assert volume.format_version == 1
    ino = write_file(vfs, b"f", b"version one")
    raw = (volume.backing / "f").read_bytes()
    header = FileHeader.parse(raw)
    assert header.version == 1
    data_key = data_key_of(raw, volume, fake_keys)
    header_key = hkdf(data_key, b"envfs v1 header", salt=header.file_id)
    assert raw[MAC_OFFSET:HEADER_SIZE] == hmac_sha256(header_key, raw[:MAC_OFFSET])
    assert read_file(vfs, ino) == b"version one"


# --- a header of the other version is refused, before any key-service call ---------------


@pytest.mark.parametrize("planted", [1, 2])
def test_a_header_of_the_other_version_is_refused_without_asking(
    planted: int,
    volume: Volume,
    fake_keys: FakeKeyProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A version 1 header planted in a version 2 volume (and the reverse) is a damaged file:
    EIO, a warning with the backing path, and no key-service call."""
    if planted == 1:
        volume.format_version = 2
        volume.begin_key_change(volume.key_arn, fake_keys, ROOT)
    plant(volume, fake_keys, "planted", b"bait", planted)
    with opened(volume, fake_keys) as vfs:
        ino = vfs.lookup(ROOT_INODE, b"planted").ino
        vfs.verify_volume(KEY_USER)
        asked = len(fake_keys.decisions("Decrypt"))
        for flags in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
            with pytest.raises(
                IntegrityError, match=r"^the header's format version is not the volume's$"
            ):
                vfs.open(ino, flags, KEY_USER)
        with pytest.raises(IntegrityError):
            vfs.setattr(ino, KEY_USER, size=0)
        assert len(fake_keys.decisions("Decrypt")) == asked
    warning = (
        f"/planted': its header is format version {planted}, the volume's files are"
        f" version {3 - planted}"
    )
    assert warning in caplog.text
    assert (volume.backing / "planted").stat().st_size == fileformat.backing_size(4, 14)


# --- rewrap: the key service's ReEncrypt and rewrap_header, no data key ------------------


class Service:
    """A version 2 volume over the real embedded key service (which has ReEncrypt), with
    two keys that root and ``KEY_USER`` may use."""

    def __init__(self, root: Path) -> None:
        self.service = KeyService(KeyStore.init(root / "kms" / "local-1", "local-1"))
        self.provider = EmbeddedKeyProvider(self.service)
        self.key = self.new_key()
        self.other_key = self.new_key()
        self.volume = Volume.create(
            root / "backing", self.key, self.provider, ROOT, encrypted_names=False
        )
        self.vfs = Vfs(self.volume, self.provider, chown_new=False)

    def new_key(self) -> str:
        params = {"KeyAdministrators": ["uid:0"], "KeyUsers": ["uid:0", f"uid:{KEY_USER.uid}"]}
        arn: str = self.service.handle(ROOT, "CreateKey", params)["KeyMetadata"]["Arn"]
        return arn

    def decrypted_with(self) -> list[str]:
        """The KeyId of every Decrypt of a file's data key so far, in order."""
        records = self.service.handle(ROOT, "ListAuditRecords", {})["Records"]
        return [
            r["key_arn"]
            for r in records
            if r["operation"] == "Decrypt" and "envfs:file" in r.get("encryption_context", {})
        ]

    def reencrypt(self, name: str, to_key: str) -> tuple[str, bytes]:
        """What ``envfs rewrap`` asks: the file's wrapped key, ReEncrypted to ``to_key``
        with the same encryption context. No data key leaves the service."""
        header = FileHeader.parse((self.volume.backing / name).read_bytes())
        context = self.volume.file_context(header.file_id)
        out = self.service.handle(
            ROOT,
            "ReEncrypt",
            {
                "CiphertextBlob": header.wrapped_key,
                "SourceKeyId": header.key_arn,
                "DestinationKeyId": to_key,
                "SourceEncryptionContext": context,
                "DestinationEncryptionContext": context,
            },
        )
        assert "Plaintext" not in out
        return out["KeyId"], out["CiphertextBlob"]

    def replace_header(self, name: str, key_arn: str, wrapped: bytes) -> bytes:
        """Rewrite the file's header with rewrap_header; returns the old header."""
        path = self.volume.backing / name
        raw = path.read_bytes()
        with path.open("r+b") as f:
            f.write(fileformat.rewrap_header(raw, key_arn, wrapped))
        return raw[:HEADER_SIZE]


@pytest.fixture
def kms(tmp_path: Path) -> Iterator[Service]:
    s = Service(tmp_path)
    yield s
    s.vfs.close()
    s.service.close()


def test_a_header_rewrapped_by_reencrypt_reads_as_before(kms: Service) -> None:
    data = os.urandom(50_000)
    ino = write_file(kms.vfs, b"f", data)
    kms.volume.begin_key_change(kms.other_key, kms.provider, ROOT)  # both keys accepted
    key_arn, wrapped = kms.reencrypt("f", kms.other_key)
    assert key_arn == kms.other_key
    old = kms.replace_header("f", key_arn, wrapped)
    raw = (kms.volume.backing / "f").read_bytes()
    assert raw[MAC_OFFSET:HEADER_SIZE] == old[MAC_OFFSET:]  # the MAC was kept, not remade
    assert FileHeader.parse(raw).key_arn == kms.other_key
    before = len(kms.decrypted_with())
    assert read_file(kms.vfs, ino) == data
    assert kms.decrypted_with()[before:] == [kms.other_key]
    # And it is still writable under its new key.
    fh = kms.vfs.open(ino, os.O_RDWR, KEY_USER)
    kms.vfs.write(fh, 0, b"rewrapped")
    kms.vfs.release(fh)
    assert read_file(kms.vfs, ino) == b"rewrapped" + data[9:]


def test_a_replayed_older_wrapped_key_reads_the_same_while_its_key_is_accepted(
    kms: Service,
) -> None:
    """A wrapped key of the same file under another key unwraps to the same data key: it
    changes nothing readable, and its key must still be one the volume file accepts."""
    ino = write_file(kms.vfs, b"f", b"same data key")
    kms.volume.begin_key_change(kms.other_key, kms.provider, ROOT)
    original = FileHeader.parse((kms.volume.backing / "f").read_bytes())
    kms.replace_header("f", *kms.reencrypt("f", kms.other_key))
    kms.replace_header("f", original.key_arn, original.wrapped_key)  # the old one put back
    assert read_file(kms.vfs, ino) == b"same data key"
    kms.volume.previous_key_arns = []  # the key change is over: only other_key is accepted
    before = len(kms.decrypted_with())
    with pytest.raises(
        IntegrityError, match=r"^the header names a key the volume does not accept$"
    ):
        read_file(kms.vfs, ino)
    assert len(kms.decrypted_with()) == before  # refused before any key-service call


def test_a_header_rewrapped_to_a_key_the_volume_does_not_accept_is_refused(
    kms: Service,
) -> None:
    ino = write_file(kms.vfs, b"f", b"data")
    kms.replace_header("f", *kms.reencrypt("f", kms.other_key))  # no key change begun
    with pytest.raises(
        IntegrityError, match=r"^the header names a key the volume does not accept$"
    ):
        read_file(kms.vfs, ino)


def test_another_file_s_wrapped_key_does_not_unwrap(kms: Service) -> None:
    """The format alone accepts a header whose key ARN and wrapped key are another file's
    (its MAC does not cover them); the key service refuses to unwrap it, since the blob's
    encryption context names the other file's id."""
    ino = write_file(kms.vfs, b"mine", b"my data")
    write_file(kms.vfs, b"theirs", b"their data")
    mine = (kms.volume.backing / "mine").read_bytes()
    my_key = data_key_of(mine, kms.volume, kms.provider)
    theirs = FileHeader.parse((kms.volume.backing / "theirs").read_bytes())
    kms.replace_header("mine", theirs.key_arn, theirs.wrapped_key)
    swapped = (kms.volume.backing / "mine").read_bytes()
    header = FileHeader.parse(swapped)
    keys = FileKeys.derive(my_key, header.file_id, 2)
    assert fileformat.decrypt_file(swapped, keys) == b"my data"  # the format accepts it
    with pytest.raises(InvalidCiphertextException):
        read_file(kms.vfs, ino)


def test_an_edited_key_arn_makes_the_file_unreadable(kms: Service) -> None:
    """The key ARN must name the key the blob is under: edited to another accepted key,
    the key service refuses (IncorrectKeyException, EIO)."""
    ino = write_file(kms.vfs, b"f", b"data")
    kms.volume.begin_key_change(kms.other_key, kms.provider, ROOT)
    header = FileHeader.parse((kms.volume.backing / "f").read_bytes())
    kms.replace_header("f", kms.other_key, header.wrapped_key)
    with pytest.raises(IncorrectKeyException):
        read_file(kms.vfs, ino)


def test_a_header_of_another_file_of_the_volume_opens_none_of_its_blocks(
    kms: Service,
) -> None:
    """Unchanged from version 1: a whole header (with its MAC) moved over another file's
    blocks verifies, but its data key opens no block; the final block is checked before
    anything is served."""
    for data in (b"x" * 100, b"y" * (3 * kms.volume.block_size)):  # and an empty final block
        ino = write_file(kms.vfs, b"target", data)
        write_file(kms.vfs, b"donor", b"other data")
        path = kms.volume.backing / "target"
        donor = (kms.volume.backing / "donor").read_bytes()
        path.write_bytes(donor[:HEADER_SIZE] + path.read_bytes()[HEADER_SIZE:])
        fh = kms.vfs.open(ino, os.O_RDONLY, KEY_USER)
        try:
            final = len(data) >> kms.volume.block_shift
            with pytest.raises(IntegrityError, match=rf"^block {final} failed authentication$"):
                kms.vfs.read(fh, 0, 1)
        finally:
            kms.vfs.release(fh)
        kms.vfs.unlink(ROOT_INODE, b"target")
        kms.vfs.unlink(ROOT_INODE, b"donor")


def test_rewrap_header_refuses_a_v1_file_of_a_v1_volume(vfs: Vfs, volume: Volume) -> None:
    write_file(vfs, b"f", b"data")
    raw = (volume.backing / "f").read_bytes()
    with pytest.raises(fileformat.NotRewrappableError):
        fileformat.rewrap_header(raw, volume.key_arn, b"\x01" * 60)
    assert FileHeader.parse(raw).version == 1
