"""The key service's golden vectors (tests/golden/kms-v1.json, docs/kms.md §6-§8).

Each vector is checked twice: envfs must read (and, given the same random bytes, write)
exactly these bytes, and a computation written from the documentation alone, with
``cryptography`` and the standard library, must agree. The last test reads a store made
by envfs the documented way, without envfs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from envfs import crypto
from envfs.errors import InvalidCiphertextException
from envfs.identity import Caller
from envfs.kms import archive, audit, blob, journal
from envfs.kms.model import encode_context
from envfs.kms.rootkey import _decode_root_key
from envfs.kms.service import KeyService
from envfs.kms.store import KeyStore

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "kms-v1.json"
DOCUMENT: dict[str, Any] = json.loads(GOLDEN.read_text())
BLOBS = {v["name"]: v for v in DOCUMENT["blobs"]}
ERRORS = {"InvalidCiphertextException": InvalidCiphertextException}


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def hkdf(key: bytes, info: bytes, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def subkey(name: str) -> bytes:
    (entry,) = [k for k in DOCUMENT["root_key"]["subkeys"] if k["name"] == name]
    return h(entry["key"])


def test_the_document_is_what_the_tests_expect() -> None:
    assert DOCUMENT["blob_version"] == blob.BLOB_VERSION == 1
    assert len(DOCUMENT["blobs"]) >= 10 and len(DOCUMENT["broken_blobs"]) >= 20
    assert {v["kind"] for v in DOCUMENT["blobs"]} == {
        "Encrypt",
        "ReEncrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
    }


# --- root key and sealing (§7) -----------------------------------------------------------


def test_root_key_sub_keys() -> None:
    section = DOCUMENT["root_key"]
    root = h(section["root_key"])
    assert _decode_root_key(h(section["root_key_file"]), "vector") == root
    assert base64.b64decode(h(section["root_key_file"])) == root
    assert [k["info"] for k in section["subkeys"]] == [
        "envfs-kms v1 material seal",
        "envfs-kms v1 audit chain",
        "envfs-kms v1 root check",
        "envfs-kms v1 audit journal",
    ]
    for entry in section["subkeys"]:
        info = entry["info"].encode()
        assert crypto.hkdf(root, info) == hkdf(root, info) == h(entry["key"])
        # "no salt" is RFC 5869's default: 32 zero bytes
        assert hkdf(root, info, salt=bytes(32)) == h(entry["key"])


def test_passphrase_root_key() -> None:
    p = DOCUMENT["root_key"]["passphrase"]
    salt, n = h(p["scrypt_salt"]), p["scrypt_n"]
    expected = h(p["root_key"])
    assert crypto.scrypt(p["passphrase"].encode(), salt, n=n) == expected
    independent = Scrypt(salt=salt, length=32, n=n, r=p["scrypt_r"], p=p["scrypt_p"])
    assert independent.derive(p["passphrase"].encode()) == expected


@pytest.mark.parametrize("entry", DOCUMENT["sealed_material"], ids=lambda e: str(e["version"]))
def test_sealed_material(entry: dict[str, Any]) -> None:
    key_id, version, region = entry["key_id"], entry["version"], entry["region"]
    aad = b"envfs-kms v1 material" + u32(len(region)) + region.encode()
    aad += u32(len(key_id)) + key_id.encode() + u32(version)
    assert aad == h(entry["aad"])
    assert KeyStore._material_aad(SimpleNamespace(region=region), key_id, version) == aad  # type: ignore[arg-type]
    sealed = h(entry["sealed"])
    assert len(sealed) == 12 + 32 + 16 and sealed[:12] == h(entry["nonce"])
    key = subkey("material_seal")
    assert crypto.Aead(key).open(sealed, aad) == h(entry["material"])
    assert AESGCM(key).decrypt(sealed[:12], sealed[12:], aad) == h(entry["material"])


def test_root_check() -> None:
    entry = DOCUMENT["root_check"]
    sealed = h(entry["sealed"])
    key = subkey("root_check")
    opened = AESGCM(key).decrypt(sealed[:12], sealed[12:], entry["region"].encode())
    assert opened == entry["plaintext"].encode() == b"envfs-kms root key check"
    assert crypto.Aead(key).open(sealed, entry["region"].encode()) == opened


# --- ciphertext blobs (§6) ---------------------------------------------------------------


@pytest.mark.parametrize("entry", DOCUMENT["contexts"], ids=lambda e: e["encoding"][:24])
def test_context_encoding(entry: dict[str, Any]) -> None:
    assert encode_context(entry["context"]).hex() == entry["encoding"]


@pytest.mark.parametrize("vector", DOCUMENT["blobs"], ids=lambda v: v["name"])
def test_blob_opens_to_its_plaintext(vector: dict[str, Any]) -> None:
    data, material, plaintext = h(vector["blob"]), h(vector["material"]), h(vector["plaintext"])
    context, region = vector["context"], vector["region"]
    assert len(data) == vector["blob_size"] == 65 + len(plaintext)
    header = blob.parse_blob(data)
    assert (header.key_id, header.key_version, header.salt) == (
        vector["key_id"],
        vector["key_version"],
        h(vector["salt"]),
    )
    assert blob.open_blob(material, region, header, data, context) == plaintext

    # From the documentation alone.
    assert data[0] == 1
    assert data[1:17] == bytes.fromhex(vector["key_id"].replace("-", ""))
    assert struct.unpack(">I", data[17:21])[0] == vector["key_version"]
    assert data[21:37] == h(vector["salt"]) and data[37:49] == h(vector["nonce"])
    assert h(vector["canonical_context"]) == encode_context(context)
    blob_key = hkdf(material, b"envfs-kms v1 blob", salt=data[21:37])
    assert blob_key == h(vector["blob_key"])
    aad = b"envfs-kms v1 blob" + u32(len(region.encode())) + region.encode() + data[:37]
    aad += h(vector["canonical_context"])
    assert aad == h(vector["aad"])
    assert AESGCM(blob_key).decrypt(data[37:49], data[49:], aad) == plaintext


@pytest.mark.parametrize("vector", DOCUMENT["blobs"], ids=lambda v: v["name"])
def test_blob_is_written_byte_for_byte(
    vector: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given the vector's salt and nonce as its random bytes, envfs writes the same blob."""
    randomness: Iterator[bytes] = iter([h(vector["salt"]), h(vector["nonce"])])

    def urandom(n: int) -> bytes:
        out = next(randomness)
        assert len(out) == n
        return out

    monkeypatch.setattr(crypto.os, "urandom", urandom)
    sealed = blob.seal_blob(
        h(vector["material"]),
        vector["region"],
        vector["key_id"],
        vector["key_version"],
        h(vector["plaintext"]),
        vector["context"],
    )
    monkeypatch.undo()
    assert sealed == h(vector["blob"])


@pytest.mark.parametrize("case", DOCUMENT["broken_blobs"], ids=lambda c: c["name"])
def test_broken_blob_is_refused(case: dict[str, Any]) -> None:
    vector = BLOBS[case["open_as"]]
    data = h(case["blob"])
    material = h(case.get("material", vector["material"]))
    region = case.get("region", vector["region"])
    context = case.get("context", vector["context"])
    error = ERRORS[case["error"]]
    if case["stage"] == "parse":
        with pytest.raises(error, match=case["match"]):
            blob.parse_blob(data)
        return
    header = blob.parse_blob(data)
    with pytest.raises(error, match=case["match"]):
        blob.open_blob(material, region, header, data, context)
    # and independently: the documented key and AAD do not authenticate it
    aad = b"envfs-kms v1 blob" + u32(len(region.encode())) + region.encode() + data[:37]
    aad += encode_context(context)
    with pytest.raises(InvalidTag):
        AESGCM(hkdf(material, b"envfs-kms v1 blob", salt=data[21:37])).decrypt(
            data[37:49], data[49:], aad
        )


# --- audit journal (§8) ------------------------------------------------------------------


def test_journal_records() -> None:
    section = DOCUMENT["journal"]
    key = h(section["key"])
    assert key == subkey("audit_journal")
    name = section["file_name"].encode()
    data = b""
    for entry in section["records"]:
        body = entry["text"].encode()
        assert entry["offset"] == len(data)
        tag = hmac_sha256(
            key, b"envfs-kms v1 audit journal" + u32(len(name)) + name + u64(len(data)) + body
        )
        assert tag.hex() == entry["tag"]
        data += u32(len(body)) + body + tag
    assert data == h(section["file"])
    found, end = journal.read_records(key, section["file_name"], data)
    assert [audit.EncodedRecord(r).text for r in found] == [e["text"] for e in section["records"]]
    assert end == len(data)


def test_journal_is_written_byte_for_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    section = DOCUMENT["journal"]
    hex_name = section["file_name"].removeprefix(journal.PREFIX).removesuffix(journal.SUFFIX)
    monkeypatch.setattr(journal.secrets, "token_hex", lambda n: hex_name)
    j = journal.Journal(tmp_path, h(section["key"]))
    for entry in section["records"]:
        j.append(entry["text"])
    j.close()
    assert j.path.name == section["file_name"]
    assert j.path.read_bytes() == h(section["file"])


@pytest.mark.parametrize("case", DOCUMENT["journal"]["reads"], ids=lambda c: c["name"])
def test_journal_reads(case: dict[str, Any]) -> None:
    key = h(DOCUMENT["journal"]["key"])
    data = h(case["data"])
    found, end = journal.read_records(key, case["file_name"], data, case["start"])
    assert (len(found), end) == (case["records"], case["end"])
    assert journal.damaged_at(data, end) is case["damaged"]


# --- audit chain, head, checkpoint, archive (§8) -----------------------------------------


def memory_log(key: bytes) -> tuple[sqlite3.Connection, audit.AuditLog]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
    conn.execute("CREATE TABLE audit (seq INTEGER PRIMARY KEY, record TEXT NOT NULL, mac BLOB)")
    log = audit.AuditLog(conn, key)
    log.write_head(0, bytes(32))
    log.write_checkpoint(0, bytes(32))
    return conn, log


def meta(conn: sqlite3.Connection, name: str) -> bytes:
    return bytes(conn.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()[0])


def test_audit_chain_head_and_checkpoint() -> None:
    section = DOCUMENT["audit_chain"]
    key = h(section["key"])
    assert key == subkey("audit_chain")
    prev = bytes(32)
    for entry in section["records"]:
        text = json.dumps(
            {"seq": entry["seq"], **entry["record"]}, sort_keys=True, separators=(",", ":")
        )
        assert text == entry["text"] == audit.EncodedRecord(entry["record"]).with_seq(entry["seq"])
        prev = hmac_sha256(key, prev + u64(entry["seq"]) + text.encode())
        assert prev.hex() == entry["mac"]

    def anchor(label: bytes, seq: int, mac: bytes) -> bytes:
        return u64(seq) + mac + hmac_sha256(key, label + u64(seq) + mac)

    macs = [h(e["mac"]) for e in section["records"]]
    assert anchor(b"head", 3, macs[2]) == h(section["head"])
    assert anchor(b"checkpoint", 0, bytes(32)) == h(section["checkpoint_initial"])
    assert anchor(b"checkpoint", 2, macs[1]) == h(section["checkpoint_after_archiving_2"])

    # envfs's AuditLog writes the same rows and anchors, and reads them back.
    conn, log = memory_log(key)
    assert meta(conn, "audit_checkpoint") == h(section["checkpoint_initial"])
    for entry in section["records"]:
        log.append(entry["record"])
    rows = conn.execute("SELECT seq, record, mac FROM audit ORDER BY seq").fetchall()
    assert [(s, t, bytes(m).hex()) for s, t, m in rows] == [
        (e["seq"], e["text"], e["mac"]) for e in section["records"]
    ]
    assert meta(conn, "audit_head") == h(section["head"])
    assert audit.decode_anchor(key, b"head", h(section["head"])) == audit.Anchor(3, macs[2])
    assert audit.decode_anchor(key, b"checkpoint", h(section["head"])) is None
    log.cut(audit.Anchor(2, macs[1]))
    assert meta(conn, "audit_checkpoint") == h(section["checkpoint_after_archiving_2"])
    assert log.verify() == audit.Verification(1, 2, None)


def test_audit_archive(tmp_path: Path) -> None:
    section = DOCUMENT["audit_chain"]
    key = h(section["key"])
    lines = section["archive_of_records_1_and_2"]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    report = archive.verify(path, key)
    assert (report.problem, report.kind, report.first, report.last) == (None, "pruned", 1, 2)
    macs = [h(e["mac"]) for e in section["records"]]
    assert report.end == audit.Anchor(2, macs[1])
    # independently: every line is canonical JSON, the records chain from the start
    parsed = [json.loads(line) for line in lines]
    assert lines == [json.dumps(p, sort_keys=True, separators=(",", ":")) for p in parsed]
    start, end = parsed[0]["start"], parsed[-1]["end"]
    assert h(start["tag"]) == h(section["checkpoint_initial"])[40:]
    assert h(end["tag"]) == h(section["checkpoint_after_archiving_2"])[40:]
    prev = h(start["mac"])
    for line in parsed[1:-1]:
        prev = hmac_sha256(key, prev + u64(line["seq"]) + line["record"].encode())
        assert prev == h(line["mac"])
    assert prev == h(end["mac"]) and parsed[-1]["records"] == 2
    # envfs writes the same file from the same rows
    rows = [(e["seq"], e["text"].encode(), h(e["mac"])) for e in section["records"][:2]]
    header = {k: v for k, v in parsed[0].items() if k not in ("archive", "version")}
    again = archive.write(tmp_path / "b.jsonl", header, rows, end)
    assert again.path.read_bytes() == path.read_bytes()
    assert again.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # one changed character and it no longer verifies
    path.write_text(path.read_text().replace("alice", "alicf"))
    assert archive.verify(path, key).problem == "record 1 was altered"


# --- a real store, read the documented way ---------------------------------------------------


def test_a_store_made_by_envfs_reads_as_documented(tmp_path: Path) -> None:
    directory = tmp_path / "local-1"
    service = KeyService(KeyStore.init(directory, "local-1"))
    root = Caller.from_ids(0, 0)
    key_id = service.handle(root, "CreateKey", {})["KeyMetadata"]["KeyId"]
    context = {"purpose": "vectors"}
    params = {"KeyId": key_id, "Plaintext": b"documented", "EncryptionContext": context}
    data = service.handle(root, "Encrypt", params)["CiphertextBlob"]
    access_key = service.handle(root, "CreateAccessKey", {"UserName": "0"})["AccessKey"]
    service.close()

    root_key = base64.b64decode((directory / "root.key").read_bytes())
    conn = sqlite3.connect(directory / "keys.db")
    try:
        values = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        check = values["root_check"]
        key = hkdf(root_key, b"envfs-kms v1 root check")
        assert (
            AESGCM(key).decrypt(check[:12], check[12:], b"local-1") == b"envfs-kms root key check"
        )
        (sealed,) = conn.execute(
            "SELECT material FROM key_versions WHERE key_id=? AND version=1", (key_id,)
        ).fetchone()
        aad = b"envfs-kms v1 material" + u32(7) + b"local-1" + u32(36) + key_id.encode() + u32(1)
        material = AESGCM(hkdf(root_key, b"envfs-kms v1 material seal")).decrypt(
            sealed[:12], sealed[12:], aad
        )
        blob_key = hkdf(material, b"envfs-kms v1 blob", salt=data[21:37])
        blob_aad = b"envfs-kms v1 blob" + u32(7) + b"local-1" + data[:37] + encode_context(context)
        assert AESGCM(blob_key).decrypt(data[37:49], data[49:], blob_aad) == b"documented"
        audit_key = hkdf(root_key, b"envfs-kms v1 audit chain")
        prev, seq = bytes(32), 0
        for seq, text, mac in conn.execute("SELECT seq, record, mac FROM audit ORDER BY seq"):
            prev = hmac_sha256(audit_key, prev + u64(seq) + text.encode())
            assert prev == mac
        head = values["audit_head"]
        assert head == u64(seq) + prev + hmac_sha256(audit_key, b"head" + u64(seq) + prev)
        checkpoint = values["audit_checkpoint"]
        zero = bytes(32)
        assert checkpoint == u64(0) + zero + hmac_sha256(audit_key, b"checkpoint" + u64(0) + zero)
        assert values["schema"] == 3 and seq == 3
        access_key_id = access_key["AccessKeyId"]
        (sealed, uid) = conn.execute(
            "SELECT secret, uid FROM access_keys WHERE access_key_id=?", (access_key_id,)
        ).fetchone()
        aad = b"envfs-kms v1 access key secret" + u32(7) + b"local-1" + u32(20)
        aad += access_key_id.encode() + u32(len(str(uid))) + str(uid).encode()
        secret = AESGCM(hkdf(root_key, b"envfs-kms v1 access key secret seal")).decrypt(
            sealed[:12], sealed[12:], aad
        )
        assert secret == access_key["SecretAccessKey"].encode()
    finally:
        conn.close()
