"""Ciphertext blobs: layout, tampering, truncation, the encryption context's canonical form,
and keys, ARNs and blobs of another region."""

from __future__ import annotations

import os
import shutil
import struct
import unicodedata
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from envfs.errors import (
    IncorrectKeyException,
    InvalidArnException,
    InvalidCiphertextException,
    NotFoundException,
)
from envfs.identity import Caller
from envfs.kms import blob
from envfs.kms.model import encode_context
from envfs.kms.service import KeyService
from envfs.kms.store import KeyStore

REGION_A = "local-1"
REGION_B = "eu-west-1"
ROOT = Caller.from_ids(0, 0)
HEAD = blob.HEAD_SIZE  # 37: version, key id, key version, salt


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fresh store per region, copied for each test (init costs several fsyncs)."""
    base = tmp_path_factory.mktemp("templates")
    for region in (REGION_A, REGION_B):
        KeyStore.init(base / region, region).close()
    return {region: base / region for region in (REGION_A, REGION_B)}


def _service(templates: dict[str, Path], tmp_path: Path, region: str) -> KeyService:
    directory = tmp_path / "kms" / region
    shutil.copytree(templates[region], directory)
    return KeyService(KeyStore.open(directory, region))


@pytest.fixture
def service(templates: dict[str, Path], tmp_path: Path) -> Iterator[KeyService]:
    svc = _service(templates, tmp_path, REGION_A)
    yield svc
    svc.close()


@pytest.fixture
def service_b(templates: dict[str, Path], tmp_path: Path) -> Iterator[KeyService]:
    svc = _service(templates, tmp_path, REGION_B)
    yield svc
    svc.close()


def create_key(service: KeyService) -> str:
    key_id: str = service.handle(ROOT, "CreateKey", {})["KeyMetadata"]["KeyId"]
    return key_id


def encrypt(service: KeyService, key_id: str, plaintext: bytes, **params: Any) -> bytes:
    out = service.handle(ROOT, "Encrypt", {"KeyId": key_id, "Plaintext": plaintext, **params})
    ciphertext: bytes = out["CiphertextBlob"]
    return ciphertext


def decrypt(service: KeyService, ciphertext: bytes, **params: Any) -> bytes:
    out = service.handle(ROOT, "Decrypt", {"CiphertextBlob": ciphertext, **params})
    plaintext: bytes = out["Plaintext"]
    return plaintext


@pytest.fixture
def key_id(service: KeyService) -> str:
    return create_key(service)


# --- layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 17, 4096])
def test_blob_layout(service: KeyService, key_id: str, size: int) -> None:
    plaintext = os.urandom(size)
    ciphertext = encrypt(service, key_id, plaintext)
    assert len(ciphertext) == 65 + size == blob.OVERHEAD + size
    assert ciphertext[0] == 1
    assert ciphertext[1:17] == uuid.UUID(key_id).bytes
    assert struct.unpack(">I", ciphertext[17:21]) == (1,)
    assert decrypt(service, ciphertext) == plaintext


def test_blob_names_the_newest_version(service: KeyService, key_id: str) -> None:
    old = encrypt(service, key_id, b"old")
    service.handle(ROOT, "RotateKeyOnDemand", {"KeyId": key_id})
    new = encrypt(service, key_id, b"new")
    assert struct.unpack(">I", new[17:21]) == (2,)
    assert decrypt(service, old) == b"old"
    assert decrypt(service, new) == b"new"


def test_data_key_blob_layout(service: KeyService, key_id: str) -> None:
    out = service.handle(ROOT, "GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256"})
    assert len(out["Plaintext"]) == 32
    assert len(out["CiphertextBlob"]) == 65 + 32
    assert out["CiphertextBlob"][1:17] == uuid.UUID(key_id).bytes
    assert decrypt(service, out["CiphertextBlob"]) == out["Plaintext"]


def test_same_plaintext_gives_different_blobs(service: KeyService, key_id: str) -> None:
    first, second = encrypt(service, key_id, b"same"), encrypt(service, key_id, b"same")
    assert first[:21] == second[:21]
    assert first[21:37] != second[21:37]  # salt
    assert first[37:] != second[37:]


def test_parse_blob_reads_the_header(key_id: str, service: KeyService) -> None:
    ciphertext = encrypt(service, key_id, b"x")
    header = blob.parse_blob(ciphertext)
    assert header.key_id == key_id
    assert header.key_version == 1
    assert header.salt == ciphertext[21:37]
    assert header.encode() == ciphertext[:HEAD]


# --- tampering -----------------------------------------------------------------------------


def _flipped(data: bytes, index: int, mask: int) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_flipped_byte_is_refused(service: KeyService, key_id: str, mask: int) -> None:
    """Any change outside the key id is InvalidCiphertextException. A changed key id names
    a key this region does not have, which reads as a blob of another region: NotFound."""
    ciphertext = encrypt(service, key_id, b"sixteen byte msg", EncryptionContext={"a": "b"})
    outcomes: dict[int, type[Exception]] = {}
    for index in range(len(ciphertext)):
        with pytest.raises((InvalidCiphertextException, NotFoundException)) as excinfo:
            decrypt(service, _flipped(ciphertext, index, mask), EncryptionContext={"a": "b"})
        outcomes[index] = excinfo.type
    assert {i for i, t in outcomes.items() if t is NotFoundException} == set(range(1, 17))
    assert decrypt(service, ciphertext, EncryptionContext={"a": "b"}) == b"sixteen byte msg"


def test_tampered_blob_message_says_nothing_specific(service: KeyService, key_id: str) -> None:
    ciphertext = encrypt(service, key_id, b"x")
    for index in (0, 20, 30, 40, len(ciphertext) - 1):
        with pytest.raises(InvalidCiphertextException, match=r"^the ciphertext blob is not valid$"):
            decrypt(service, _flipped(ciphertext, index, 0x04))


@pytest.mark.parametrize("version", [0, 2, 0xFF])
def test_unknown_format_version_is_refused(service: KeyService, key_id: str, version: int) -> None:
    ciphertext = encrypt(service, key_id, b"payload")
    with pytest.raises(InvalidCiphertextException):
        decrypt(service, bytes([version]) + ciphertext[1:])
    with pytest.raises(InvalidCiphertextException):
        blob.parse_blob(bytes([version]) + ciphertext[1:])


def test_truncated_blobs_are_refused(service: KeyService, key_id: str) -> None:
    ciphertext = encrypt(service, key_id, b"payload")
    for length in range(len(ciphertext)):
        with pytest.raises(InvalidCiphertextException):
            decrypt(service, ciphertext[:length])


def test_extended_blob_is_refused(service: KeyService, key_id: str) -> None:
    ciphertext = encrypt(service, key_id, b"payload")
    for extra in (b"\x00", os.urandom(16)):
        with pytest.raises(InvalidCiphertextException):
            decrypt(service, ciphertext + extra)


def test_relabelled_version_is_refused(service: KeyService, key_id: str) -> None:
    """Both versions exist: only the AAD tells that the blob was made under version 2."""
    service.handle(ROOT, "RotateKeyOnDemand", {"KeyId": key_id})
    ciphertext = encrypt(service, key_id, b"payload")
    relabelled = ciphertext[:17] + struct.pack(">I", 1) + ciphertext[21:]
    with pytest.raises(InvalidCiphertextException):
        decrypt(service, relabelled)


def test_relabelled_key_is_refused(service: KeyService, key_id: str) -> None:
    other = create_key(service)
    ciphertext = encrypt(service, key_id, b"payload")
    relabelled = ciphertext[:1] + uuid.UUID(other).bytes + ciphertext[17:]
    with pytest.raises(InvalidCiphertextException):
        decrypt(service, relabelled)


def test_blob_of_another_key_given_with_key_id(service: KeyService, key_id: str) -> None:
    other = create_key(service)
    ciphertext = encrypt(service, key_id, b"payload")
    with pytest.raises(IncorrectKeyException):
        decrypt(service, ciphertext, KeyId=other)
    assert decrypt(service, ciphertext, KeyId=key_id) == b"payload"


def test_blob_bound_to_its_region_even_with_the_same_material() -> None:
    material, key_id = os.urandom(32), str(uuid.uuid4())
    sealed = blob.seal_blob(material, REGION_A, key_id, 1, b"payload", {"a": "b"})
    header = blob.parse_blob(sealed)
    assert blob.open_blob(material, REGION_A, header, sealed, {"a": "b"}) == b"payload"
    with pytest.raises(InvalidCiphertextException):
        blob.open_blob(material, REGION_B, header, sealed, {"a": "b"})
    with pytest.raises(InvalidCiphertextException):
        blob.open_blob(os.urandom(32), REGION_A, header, sealed, {"a": "b"})


# --- encryption context --------------------------------------------------------------------


def test_context_encoding_is_length_prefixed() -> None:
    assert encode_context({"a": "bc"}) != encode_context({"ab": "c"})
    assert encode_context({"a": "bc"}) == (
        b"\x00\x00\x00\x01" + b"\x00\x00\x00\x01a" + b"\x00\x00\x00\x02bc"
    )
    assert encode_context({}) == b"\x00\x00\x00\x00"


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ({"a": "bc"}, {"ab": "c"}),
        ({"a": "b", "c": "d"}, {"a": "b\x00\x00\x00\x01c\x00\x00\x00\x01d"}),
        ({"a": ""}, {}),
        ({"k": "v"}, {"K": "v"}),
        ({"k": "v"}, {"k": "v "}),
    ],
)
def test_context_encoding_is_injective(one: dict[str, str], other: dict[str, str]) -> None:
    assert encode_context(one) != encode_context(other)


def test_context_encoding_ignores_order() -> None:
    forward = {"alpha": "1", "beta": "2", "gamma": "3"}
    backward = dict(reversed(list(forward.items())))
    assert list(forward) != list(backward)
    assert encode_context(forward) == encode_context(backward)


def test_context_encoding_of_unicode_counts_utf8_bytes() -> None:
    encoded = encode_context({"é": "€", "a": "ключ"})
    assert encoded == (
        b"\x00\x00\x00\x02"
        + b"\x00\x00\x00\x01a"
        + b"\x00\x00\x00\x08"
        + "ключ".encode()
        + b"\x00\x00\x00\x02"
        + "é".encode()
        + b"\x00\x00\x00\x03"
        + "€".encode()
    )


@pytest.mark.parametrize(
    "wrong",
    [{"ab": "c"}, {}, None, {"a": "bc", "x": "y"}, {"a": "bd"}, {"A": "bc"}],
    ids=["shifted", "empty", "absent", "extra-pair", "other-value", "other-case"],
)
def test_blob_needs_its_exact_context(
    service: KeyService, key_id: str, wrong: dict[str, str] | None
) -> None:
    ciphertext = encrypt(service, key_id, b"payload", EncryptionContext={"a": "bc"})
    with pytest.raises(InvalidCiphertextException, match=r"^the ciphertext blob is not valid$"):
        decrypt(service, ciphertext, EncryptionContext=wrong)
    assert decrypt(service, ciphertext, EncryptionContext={"a": "bc"}) == b"payload"


def test_blob_without_context_needs_none(service: KeyService, key_id: str) -> None:
    ciphertext = encrypt(service, key_id, b"payload")
    assert decrypt(service, ciphertext) == b"payload"
    assert decrypt(service, ciphertext, EncryptionContext={}) == b"payload"
    with pytest.raises(InvalidCiphertextException):
        decrypt(service, ciphertext, EncryptionContext={"a": "bc"})


def test_context_order_does_not_matter_to_decrypt(service: KeyService, key_id: str) -> None:
    context = {"purpose": "test", "team": "hr", "file": "/srv/a"}
    ciphertext = encrypt(service, key_id, b"payload", EncryptionContext=context)
    reordered = dict(sorted(context.items(), reverse=True))
    assert decrypt(service, ciphertext, EncryptionContext=reordered) == b"payload"


def test_unicode_context_is_not_normalised(service: KeyService, key_id: str) -> None:
    composed = unicodedata.normalize("NFC", "café")
    decomposed = unicodedata.normalize("NFD", "café")
    assert composed != decomposed
    ciphertext = encrypt(service, key_id, b"payload", EncryptionContext={"name": composed})
    assert decrypt(service, ciphertext, EncryptionContext={"name": composed}) == b"payload"
    with pytest.raises(InvalidCiphertextException):
        decrypt(service, ciphertext, EncryptionContext={"name": decomposed})


# --- regions -------------------------------------------------------------------------------


def test_blob_of_another_region_is_not_found(
    service: KeyService, service_b: KeyService, key_id: str
) -> None:
    ciphertext = encrypt(service, key_id, b"payload")
    with pytest.raises(NotFoundException, match=rf"^key '.*{key_id}' does not exist in region"):
        decrypt(service_b, ciphertext)
    assert decrypt(service, ciphertext) == b"payload"


def test_key_of_another_region_is_not_found(
    service: KeyService, service_b: KeyService, key_id: str
) -> None:
    arn = service.handle(ROOT, "DescribeKey", {"KeyId": key_id})["KeyMetadata"]["Arn"]
    assert arn == f"arn:envfs:kms:{REGION_A}:{service.account}:key/{key_id}"
    with pytest.raises(
        NotFoundException, match=rf"^key '{arn}' does not exist in region '{REGION_B}'$"
    ):
        service_b.handle(ROOT, "DescribeKey", {"KeyId": arn})
    for ref in (arn, key_id):
        with pytest.raises(NotFoundException):
            encrypt(service_b, ref, b"payload")
    # the ARN with B's region but A's account names nothing in B either
    moved = arn.replace(f":{REGION_A}:", f":{REGION_B}:")
    with pytest.raises(NotFoundException):
        service_b.handle(ROOT, "DescribeKey", {"KeyId": moved})


def test_alias_arn_of_another_region_is_not_found(
    service: KeyService, service_b: KeyService, key_id: str
) -> None:
    service.handle(ROOT, "CreateAlias", {"AliasName": "alias/shared", "TargetKeyId": key_id})
    service_b.handle(
        ROOT, "CreateAlias", {"AliasName": "alias/shared", "TargetKeyId": create_key(service_b)}
    )
    alias_arn = f"arn:envfs:kms:{REGION_A}:{service.account}:alias/shared"
    with pytest.raises(NotFoundException):
        encrypt(service_b, alias_arn, b"payload")
    assert encrypt(service, alias_arn, b"payload")[1:17] == uuid.UUID(key_id).bytes


def test_blob_of_another_region_given_with_its_key_arn(
    service: KeyService, service_b: KeyService, key_id: str
) -> None:
    ciphertext = encrypt(service, key_id, b"payload")
    arn = f"arn:envfs:kms:{REGION_A}:{service.account}:key/{key_id}"
    with pytest.raises(NotFoundException):
        decrypt(service_b, ciphertext, KeyId=arn)


@pytest.mark.parametrize(
    "arn",
    [
        "arn:envfs:kms:EU_WEST:{account}:key/{key_id}",
        "arn:envfs:kms::{account}:key/{key_id}",
        "arn:envfs:kms:eu-west-:{account}:key/{key_id}",
        "arn:envfs:kms:{region}:12345:key/{key_id}",
        "arn:aws:kms:{region}:{account}:key/{key_id}",
        "arn:envfs:kms:{region}:{account}:secret/{key_id}",
    ],
)
def test_malformed_arn(service: KeyService, key_id: str, arn: str) -> None:
    text = arn.format(region=REGION_A, account=service.account, key_id=key_id)
    with pytest.raises(InvalidArnException):
        service.handle(ROOT, "DescribeKey", {"KeyId": text})


def test_malformed_region_in_arn_message(service: KeyService, key_id: str) -> None:
    text = f"arn:envfs:kms:EU_WEST:{service.account}:key/{key_id}"
    with pytest.raises(
        InvalidArnException, match=rf"^ARN '{text}' has a malformed region or account$"
    ):
        encrypt(service, text, b"payload")
