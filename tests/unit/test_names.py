"""Encrypted names of format version 2 (``envfs/files/names.py``; ``docs/format.md``).

Round trips over every length and byte, what an encrypted name leaks (a padded length),
its binding to its directory, long names and their name files, directory id files, symlink
targets, and the golden vectors, also decrypted independently with pyca and hashlib.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from envfs import crypto
from envfs.errors import IntegrityError
from envfs.files import names

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "names-v2.json").read_text())
VOLUME_ID = "0b9e6c2e-7f41-4d2a-8c1e-5a6b7c8d9e0f"
KEYS = names.NameKeys.derive(b"\x07" * 32, VOLUME_ID)
SIV = crypto.Siv(KEYS.name_key)
META = crypto.Aead(KEYS.meta_key)
DIR_A = bytes(range(16))
DIR_B = bytes(range(16, 32))


def padded_length(name: bytes) -> int:
    return (len(name) // 32 + 1) * 32


@pytest.mark.parametrize("length", range(1, 256))
def test_every_length_round_trips_and_leaks_only_its_padded_length(length: int) -> None:
    name = bytes((i * 7 + length) % 254 + 1 for i in range(length)).replace(b"/", b"-")
    encoded = names.encrypt_name(SIV, DIR_A, name)
    assert names.decrypt_name(SIV, DIR_A, encoded) == name
    other = names.encrypt_name(SIV, DIR_A, b"z" * length)
    assert len(encoded) == len(other)  # the length says the padded length, no more
    assert len(base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4))) == (
        padded_length(name) + 16
    )


def test_any_byte_but_slash_and_nul_round_trips() -> None:
    every = bytes(b for b in range(1, 256) if b != ord("/"))
    for name in (every[:128], every[128:], b".hidden", b"..x", b"CASE", b"case"):
        assert names.decrypt_name(SIV, DIR_A, names.encrypt_name(SIV, DIR_A, name)) == name
    upper, lower = (names.encrypt_name(SIV, DIR_A, n) for n in (b"CASE", b"case"))
    assert upper != lower  # case-sensitive


def test_encrypted_names_are_deterministic_per_directory() -> None:
    assert names.encrypt_name(SIV, DIR_A, b"x") == names.encrypt_name(SIV, DIR_A, b"x")
    assert names.encrypt_name(SIV, DIR_A, b"x") != names.encrypt_name(SIV, DIR_B, b"x")
    other = names.NameKeys.derive(b"\x07" * 32, "11111111-2222-4333-8444-555555555555")
    other_volume = crypto.Siv(other.name_key)
    assert names.encrypt_name(SIV, DIR_A, b"x") != names.encrypt_name(other_volume, DIR_A, b"x")


def test_a_name_moved_to_another_directory_does_not_decrypt() -> None:
    encoded = names.encrypt_name(SIV, DIR_A, b"secret-plan.txt")
    with pytest.raises(IntegrityError):
        names.decrypt_name(SIV, DIR_B, encoded)


@pytest.mark.parametrize("name", [b"a", b"x" * 200, b".envfs-dir"])
def test_encoded_names_never_look_like_envfs_own_or_special_entries(name: bytes) -> None:
    encoded = names.encrypt_name(SIV, DIR_A, name)
    assert b"." not in encoded and b"/" not in encoded and b"=" not in encoded
    assert not names.backing_name(encoded).startswith(names.DIR_FILE)


@pytest.mark.parametrize(
    ("name", "code"),
    [(b"", errno.EINVAL), (b".", errno.EINVAL), (b"..", errno.EINVAL), (b"a/b", errno.EINVAL),
     (b"a\0b", errno.EINVAL), (b"x" * 256, errno.ENAMETOOLONG)],
)  # fmt: skip
def test_names_ext4_refuses_are_refused(name: bytes, code: int) -> None:
    with pytest.raises(OSError) as caught:
        names.encrypt_name(SIV, DIR_A, name)
    assert caught.value.errno == code


def test_tampered_or_foreign_encoded_names_are_refused() -> None:
    encoded = names.encrypt_name(SIV, DIR_A, b"report.pdf")
    flipped = encoded[:-1] + (b"A" if encoded[-1:] != b"A" else b"B")
    for bad in (flipped, encoded[:-2], b"plain-name.txt", b"!!!", encoded + b"=", b""):
        with pytest.raises(IntegrityError):
            names.decrypt_name(SIV, DIR_A, bad)


def test_a_name_whose_padding_is_wrong_is_refused_although_authentic() -> None:
    for padded in (b"name" + b"\x00" * 28, b"name" + b"\x05" * 27 + b"\x06", b"\x21" * 32):
        sealed = AESSIV(KEYS.name_key).encrypt(padded, [b"envfs v2 name", DIR_A])
        encoded = base64.urlsafe_b64encode(sealed).rstrip(b"=")
        with pytest.raises(IntegrityError):
            names.decrypt_name(SIV, DIR_A, encoded)


def test_a_decrypted_name_must_be_a_valid_name() -> None:
    for bad in (b"a/b", b"..", b"x\0y"):
        sealed = AESSIV(KEYS.name_key).encrypt(names.pad(bad), [b"envfs v2 name", DIR_A])
        with pytest.raises(IntegrityError):
            names.decrypt_name(SIV, DIR_A, base64.urlsafe_b64encode(sealed).rstrip(b"="))


def test_names_up_to_159_bytes_are_short_and_longer_ones_long() -> None:
    short = names.encrypt_name(SIV, DIR_A, b"s" * 159)
    long = names.encrypt_name(SIV, DIR_A, b"l" * 160)
    assert len(short) <= names.NAME_MAX and names.backing_name(short) == short
    backing = names.backing_name(long)
    assert len(long) > names.NAME_MAX
    assert backing.startswith(names.LONG_PREFIX) and len(backing) == 51
    assert names.is_long(backing) and not names.is_long(short)
    assert not names.is_long(names.name_file(backing))
    names.check_long(backing, long)


def test_a_swapped_or_edited_name_file_is_detected() -> None:
    first = names.encrypt_name(SIV, DIR_A, b"1" * 200)
    second = names.encrypt_name(SIV, DIR_A, b"2" * 200)
    with pytest.raises(IntegrityError):
        names.check_long(names.backing_name(first), second)
    with pytest.raises(IntegrityError):
        names.check_long(names.backing_name(first), first[:-1] + b"A")
    short = names.encrypt_name(SIV, DIR_A, b"short")
    with pytest.raises(IntegrityError):  # a short name never has a name file
        names.check_long(names.backing_name(short), short)


def test_directory_id_files_round_trip_and_refuse_what_is_not_theirs() -> None:
    content = names.encode_dir_file(KEYS, DIR_A, VOLUME_ID)
    assert len(content) == names.DIR_FILE_SIZE
    assert names.parse_dir_file(KEYS, content, VOLUME_ID) == DIR_A
    other_volume = "11111111-2222-4333-8444-555555555555"
    bad = [
        content[:-1],
        content + b"\0",
        content[:10] + bytes([content[10] ^ 1]) + content[11:],  # another id
        b"envfsDIX" + content[8:],
        content[:8] + b"\x00\x03" + content[10:],
    ]
    for data in bad:
        with pytest.raises(IntegrityError):
            names.parse_dir_file(KEYS, data, VOLUME_ID)
    with pytest.raises(IntegrityError):  # a file of another volume
        names.parse_dir_file(KEYS, content, other_volume)
    assert names.new_dir_id() != names.new_dir_id()


def test_symlink_targets_round_trip_fresh_each_time_and_refuse_tampering() -> None:
    target = b"../../shared/" + bytes(range(1, 200))
    first, second = names.encrypt_target(META, target), names.encrypt_target(META, target)
    assert first != second  # a random nonce each time
    assert names.decrypt_target(META, first) == names.decrypt_target(META, second) == target
    for bad in (first[:-1], first[:-1] + (b"A" if first[-1:] != b"A" else b"B"), b"plain"):
        with pytest.raises(IntegrityError):
            names.decrypt_target(META, bad)
    with pytest.raises(OSError) as caught:
        names.encrypt_target(META, b"")
    assert caught.value.errno == errno.EINVAL


def test_padding_round_trips_and_refuses_what_pad_never_writes() -> None:
    for n in range(0, 100):
        assert names.unpad(names.pad(b"q" * n)) == b"q" * n
        assert len(names.pad(b"q" * n)) % 32 == 0
    for bad in (b"", b"\x01" * 31, b"\x00" * 32, b"\x21" * 32, b"a" * 30 + b"\x01\x02"):
        with pytest.raises(IntegrityError):
            names.unpad(bad)


def test_name_keys_never_show_in_their_repr() -> None:
    assert KEYS.name_key.hex() not in repr(KEYS) and "secret" in repr(KEYS)


# --- golden vectors ----------------------------------------------------------------------


def test_golden_keys_derive_as_recorded() -> None:
    keys = names.NameKeys.derive(bytes.fromhex(GOLDEN["volume_secret"]), GOLDEN["volume_id"])
    assert keys.name_key.hex() == GOLDEN["keys"]["name_key"]
    assert keys.dir_mac_key.hex() == GOLDEN["keys"]["dir_mac_key"]
    assert keys.meta_key.hex() == GOLDEN["keys"]["meta_key"]


@pytest.mark.parametrize("vector", GOLDEN["names"], ids=lambda v: v["label"])
def test_golden_names_encrypt_and_decrypt_as_recorded(vector: dict[str, str]) -> None:
    siv = crypto.Siv(bytes.fromhex(GOLDEN["keys"]["name_key"]))
    dir_id, name = bytes.fromhex(vector["dir_id"]), bytes.fromhex(vector["name"])
    encoded = names.encrypt_name(siv, dir_id, name)
    assert encoded.decode() == vector["encoded"]
    assert names.backing_name(encoded).decode() == vector["backing"]
    assert names.decrypt_name(siv, dir_id, encoded) == name


def _hkdf(secret: bytes, info: bytes, length: int, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def test_golden_vectors_read_by_an_independent_implementation() -> None:
    """The draft's text alone (HKDF, AES-SIV, padding, base64url, SHA-256), with pyca and
    hashlib and none of envfs's code."""
    import uuid

    secret, salt = bytes.fromhex(GOLDEN["volume_secret"]), uuid.UUID(GOLDEN["volume_id"]).bytes
    name_key = _hkdf(secret, b"envfs v2 names", 64, salt)
    dir_mac_key = _hkdf(secret, b"envfs v2 directory ids", 32, salt)
    for vector in GOLDEN["names"]:
        encoded = vector["encoded"].encode()
        sealed = base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4))
        padded = AESSIV(name_key).decrypt(
            sealed, [b"envfs v2 name", bytes.fromhex(vector["dir_id"])]
        )
        assert padded[: -padded[-1]] == bytes.fromhex(vector["name"])
        if len(encoded) > 255:
            digest = base64.urlsafe_b64encode(hashlib.sha256(encoded).digest()).rstrip(b"=")
            assert vector["backing"] == ".envfs-L" + digest.decode()
        else:
            assert vector["backing"] == vector["encoded"]
    content = bytes.fromhex(GOLDEN["dir_file"]["content"])
    assert content[:8] == b"envfsDIR" and content[8:10] == b"\x00\x02"
    assert content[10:26].hex() == GOLDEN["dir_file"]["dir_id"]
    mac = hmac.new(dir_mac_key, content[:26] + GOLDEN["volume_id"].encode(), "sha256").digest()
    assert content[26:] == mac
    meta_key = _hkdf(secret, b"envfs v2 metadata", 32, salt)
    encoded = GOLDEN["symlink"]["encoded"].encode()
    sealed = base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4))
    padded = AESGCM(meta_key).decrypt(sealed[:12], sealed[12:], b"envfs v2 symlink")
    assert padded[: -padded[-1]].hex() == GOLDEN["symlink"]["target"]
    assert GOLDEN["xattrs"]
    for vector in GOLDEN["xattrs"]:
        stored = vector["backing_name"].encode()
        assert stored.startswith(b"user.envfs.x.")
        encoded = stored[len(b"user.envfs.x.") :]
        sealed = base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4))
        padded = AESSIV(name_key).decrypt(sealed, [b"envfs v2 xattr", b""])
        assert b"user." + padded[: -padded[-1]] == bytes.fromhex(vector["name"])
        value = bytes.fromhex(vector["sealed"])
        assert AESGCM(meta_key).decrypt(value[:12], value[12:], stored).hex() == vector["value"]


@pytest.mark.parametrize("index", range(3))
def test_golden_xattrs_decrypt_as_recorded(index: int) -> None:
    vector = GOLDEN["xattrs"][index]
    siv = crypto.Siv(bytes.fromhex(GOLDEN["keys"]["name_key"]))
    meta = crypto.Aead(bytes.fromhex(GOLDEN["keys"]["meta_key"]))
    name = bytes.fromhex(vector["name"])
    assert names.encrypt_xattr_name(siv, name).decode() == vector["backing_name"]
    assert names.decrypt_xattr_name(siv, vector["backing_name"].encode()) == name
    sealed = bytes.fromhex(vector["sealed"])
    stored = vector["backing_name"].encode()
    assert names.decrypt_xattr_value(meta, stored, sealed).hex() == vector["value"]


def test_golden_symlink_target_decrypts() -> None:
    meta = crypto.Aead(bytes.fromhex(GOLDEN["keys"]["meta_key"]))
    target = names.decrypt_target(meta, GOLDEN["symlink"]["encoded"].encode())
    assert target == bytes.fromhex(GOLDEN["symlink"]["target"])


def test_xattr_names_and_values_round_trip_and_stay_bound() -> None:
    backing = names.encrypt_xattr_name(SIV, b"user.comment")
    assert backing.startswith(b"user.envfs.x.") and b"comment" not in backing
    assert backing == names.encrypt_xattr_name(SIV, b"user.comment")  # getxattr finds it
    assert names.decrypt_xattr_name(SIV, backing) == b"user.comment"
    sealed = names.encrypt_xattr_value(META, backing, b"reviewed")
    assert names.decrypt_xattr_value(META, backing, sealed) == b"reviewed"
    other = names.encrypt_xattr_name(SIV, b"user.other")
    with pytest.raises(IntegrityError):  # a value moved under another name
        names.decrypt_xattr_value(META, other, sealed)
    for bad in (b"user.plain", b"user.envfs.x.AAAA", backing[:-1]):
        with pytest.raises(IntegrityError):
            names.decrypt_xattr_name(SIV, bad)


def test_xattr_names_longer_than_the_backing_allows_get_erange() -> None:
    assert len(names.encrypt_xattr_name(SIV, b"user." + b"n" * 159)) <= names.NAME_MAX
    for name, code in ((b"user." + b"n" * 160, errno.ERANGE), (b"trusted.x", errno.EINVAL)):
        with pytest.raises(OSError) as caught:
            names.encrypt_xattr_name(SIV, name)
        assert caught.value.errno == code
