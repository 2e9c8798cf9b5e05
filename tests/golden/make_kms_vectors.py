"""Generate tests/golden/kms-v1.json once; the tests only ever read it.

Golden vectors of the key service's byte formats (docs/kms.md §6-§8): the root key's
sub-keys, sealed key material, ciphertext blobs (and broken ones with the error each must
raise), encryption-context encodings, audit journal records, the audit chain with its
head and checkpoint, and an audit archive.

The bytes are computed here from the specification with ``cryptography`` and the standard
library alone, then checked against envfs, so the file is a second implementation's
answer as well as envfs's. Every input (keys, salts, nonces) is derived from a label with
SHA-256, so the output is reproducible; still, golden vectors are made once: the script
refuses to overwrite them.

    .venv/bin/python tests/golden/make_kms_vectors.py [--output PATH] [--force]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import sqlite3
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from envfs.errors import InvalidCiphertextException
from envfs.kms import archive, audit, blob, journal
from envfs.kms.model import encode_context

HERE = Path(__file__).resolve().parent
REGION = "local-1"
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
OTHER_KEY_ID = "0f0e0d0c-0b0a-4908-8706-050403020100"
JOURNAL_NAME = "audit-journal-0123456789abcdef.log"
SUBKEY_INFOS = {
    "material_seal": b"envfs-kms v1 material seal",
    "audit_chain": b"envfs-kms v1 audit chain",
    "root_check": b"envfs-kms v1 root check",
    "audit_journal": b"envfs-kms v1 audit journal",
}
BLOB_INFO = b"envfs-kms v1 blob"
INVALID = r"^the ciphertext blob is not valid$"


def label_bytes(label: str, size: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"envfs golden kms {label} {counter}".encode()).digest()
        counter += 1
    return out[:size]


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def hkdf(key: bytes, info: bytes, salt: bytes | None = None, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


def canonical(context: dict[str, str]) -> bytes:
    pairs = sorted((k.encode(), v.encode()) for k, v in context.items())
    return u32(len(pairs)) + b"".join(u32(len(k)) + k + u32(len(v)) + v for k, v in pairs)


def mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


# --- root key, sub-keys, sealed material -----------------------------------------------------


def derivations(root_key: bytes) -> dict[str, Any]:
    passphrase, salt, n = b"correct horse battery staple", label_bytes("scrypt salt", 16), 2**14
    return {
        "root_key": root_key.hex(),
        "root_key_file": (base64.b64encode(root_key) + b"\n").hex(),
        "subkeys": [
            {"name": name, "info": info.decode(), "key": hkdf(root_key, info).hex()}
            for name, info in SUBKEY_INFOS.items()
        ],
        "passphrase": {
            "passphrase": passphrase.decode(),
            "scrypt_salt": salt.hex(),
            "scrypt_n": n,
            "scrypt_r": 8,
            "scrypt_p": 1,
            "root_key": Scrypt(salt=salt, length=32, n=n, r=8, p=1).derive(passphrase).hex(),
        },
    }


def sealed_material(root_key: bytes, version: int, material: bytes) -> dict[str, Any]:
    seal_key = hkdf(root_key, SUBKEY_INFOS["material_seal"])
    nonce = label_bytes(f"material nonce {version}", 12)
    aad = b"envfs-kms v1 material" + u32(len(REGION)) + REGION.encode()
    aad += u32(len(KEY_ID)) + KEY_ID.encode() + u32(version)
    return {
        "region": REGION,
        "key_id": KEY_ID,
        "version": version,
        "material": material.hex(),
        "nonce": nonce.hex(),
        "aad": aad.hex(),
        "sealed": (nonce + AESGCM(seal_key).encrypt(nonce, material, aad)).hex(),
    }


def root_check(root_key: bytes) -> dict[str, Any]:
    nonce = label_bytes("root check nonce", 12)
    key = hkdf(root_key, SUBKEY_INFOS["root_check"])
    sealed = nonce + AESGCM(key).encrypt(nonce, b"envfs-kms root key check", REGION.encode())
    return {"region": REGION, "plaintext": "envfs-kms root key check", "sealed": sealed.hex()}


# --- blobs -------------------------------------------------------------------------------------


def make_blob(
    name: str,
    kind: str,
    material: bytes,
    plaintext: bytes,
    context: dict[str, str],
    *,
    key_version: int = 1,
    region: str = REGION,
    key_id: str = KEY_ID,
) -> dict[str, Any]:
    salt, nonce = label_bytes(f"{name} salt", 16), label_bytes(f"{name} nonce", 12)
    head = bytes([1]) + bytes.fromhex(key_id.replace("-", "")) + u32(key_version) + salt
    blob_key = hkdf(material, BLOB_INFO, salt=salt)
    aad = BLOB_INFO + u32(len(region.encode())) + region.encode() + head + canonical(context)
    data = head + nonce + AESGCM(blob_key).encrypt(nonce, plaintext, aad)
    # envfs reads it the same way
    header = blob.parse_blob(data)
    assert (header.key_id, header.key_version, header.salt) == (key_id, key_version, salt)
    assert blob.open_blob(material, region, header, data, context) == plaintext
    assert encode_context(context) == canonical(context)
    return {
        "name": name,
        "kind": kind,
        "region": region,
        "key_id": key_id,
        "key_version": key_version,
        "material": material.hex(),
        "context": context,
        "canonical_context": canonical(context).hex(),
        "salt": salt.hex(),
        "nonce": nonce.hex(),
        "blob_key": blob_key.hex(),
        "aad": aad.hex(),
        "plaintext": plaintext.hex(),
        "blob": data.hex(),
        "blob_size": len(data),
    }


def broken_blob(name: str, data: bytes, of: str, stage: str, **overrides: Any) -> dict[str, Any]:
    return {
        "name": name,
        "blob": data.hex(),
        "open_as": of,  # the material, region and context of that vector...
        **overrides,  # ...except these
        "stage": stage,  # "parse": parse_blob refuses it; "open": open_blob does
        "error": "InvalidCiphertextException",
        "match": INVALID,
    }


def patched(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value) :]


def flipped(raw: bytes, offset: int) -> bytes:
    return patched(raw, offset, bytes([raw[offset] ^ 0x01]))


def blobs(material_v1: bytes, material_v2: bytes) -> tuple[list[Any], list[Any]]:
    volume_context = {
        "envfs:file": "9d2c5e1f-7a4b-4c3d-8e9f-0a1b2c3d4e5f",
        "envfs:volume": "3f0c8a52-1111-4222-8333-944455556666",
    }
    long_region = "r" + "-9" * 31  # 63 characters
    vectors = [
        make_blob("encrypt-text", "Encrypt", material_v1, b"Some text\n", {}),
        make_blob(
            "encrypt-with-context",
            "Encrypt",
            material_v1,
            b"payslip",
            {"team": "hr", "purpose": "payroll"},
        ),
        make_blob(
            "encrypt-unicode-context",
            "Encrypt",
            material_v1,
            "grüße".encode(),
            {"ключ": "värde", "emoji": "\U0001f511", "a": ""},
        ),
        make_blob("encrypt-one-byte", "Encrypt", material_v1, b"x", {}),
        make_blob(
            "encrypt-largest-plaintext",
            "Encrypt",
            material_v1,
            bytes((i * 7 + 3) % 256 for i in range(4096)),
            {},
        ),
        make_blob(
            "data-key-aes-256",
            "GenerateDataKey",
            material_v1,
            label_bytes("data key 256", 32),
            volume_context,
        ),
        make_blob(
            "data-key-aes-128",
            "GenerateDataKeyWithoutPlaintext",
            material_v1,
            label_bytes("data key 128", 16),
            {},
        ),
        make_blob(
            "data-key-1024-bytes",
            "GenerateDataKey",
            material_v1,
            label_bytes("data key 1024", 1024),
            {"k": "v"},
        ),
        make_blob(
            "rotated-version-2",
            "Encrypt",
            material_v2,
            b"after rotation",
            {},
            key_version=2,
        ),
        make_blob(
            "longest-region",
            "ReEncrypt",
            material_v1,
            b"elsewhere",
            {},
            region=long_region,
            key_id=OTHER_KEY_ID,
        ),
    ]
    by_name = {v["name"]: bytes.fromhex(v["blob"]) for v in vectors}
    text = by_name["encrypt-text"]
    ctx = by_name["encrypt-with-context"]
    cases = [
        broken_blob("empty", b"", "encrypt-text", "parse"),
        broken_blob("shorter-than-65-bytes", text[:64], "encrypt-text", "parse"),
        broken_blob("format-version-0", patched(text, 0, b"\x00"), "encrypt-text", "parse"),
        broken_blob("format-version-2", patched(text, 0, b"\x02"), "encrypt-text", "parse"),
        broken_blob("key-version-0", patched(text, 17, u32(0)), "encrypt-text", "parse"),
        broken_blob("flipped-key-id", flipped(text, 1), "encrypt-text", "open"),
        broken_blob("relabelled-version", patched(text, 17, u32(2)), "rotated-version-2", "open"),
        broken_blob("flipped-salt", flipped(text, 21), "encrypt-text", "open"),
        broken_blob("flipped-nonce", flipped(text, 37), "encrypt-text", "open"),
        broken_blob("flipped-ciphertext", flipped(text, 49), "encrypt-text", "open"),
        broken_blob("flipped-tag", flipped(text, len(text) - 1), "encrypt-text", "open"),
        broken_blob("cut-by-one-byte", text[:-1], "encrypt-text", "open"),
        broken_blob("one-byte-appended", text + b"\x00", "encrypt-text", "open"),
        broken_blob("other-region", text, "encrypt-text", "open", region="eu-west-1"),
        broken_blob("wrong-material", text, "encrypt-text", "open", material=material_v2.hex()),
        broken_blob("context-missing", ctx, "encrypt-with-context", "open", context={}),
        broken_blob(
            "context-value-changed",
            ctx,
            "encrypt-with-context",
            "open",
            context={"team": "hr", "purpose": "payrolL"},
        ),
        broken_blob(
            "context-pair-added",
            ctx,
            "encrypt-with-context",
            "open",
            context={"team": "hr", "purpose": "payroll", "x": "y"},
        ),
        broken_blob(
            # Glued without lengths, {"a": "bc"} and {"ab": "c"} would collide.
            "context-boundary-moved",
            by_name["data-key-1024-bytes"],
            "data-key-1024-bytes",
            "open",
            context={"kv": ""},
        ),
        broken_blob(
            "context-added-to-a-blob-without",
            text,
            "encrypt-text",
            "open",
            context={"": ""},
        ),
    ]
    for case in cases:
        vector = next(v for v in vectors if v["name"] == case["open_as"])
        data = bytes.fromhex(case["blob"])
        material = bytes.fromhex(case.get("material", vector["material"]))
        region = case.get("region", vector["region"])
        context = case.get("context", vector["context"])
        try:
            header = blob.parse_blob(data)
            assert case["stage"] == "open", case["name"]
            blob.open_blob(material, region, header, data, context)
        except InvalidCiphertextException:
            continue
        raise AssertionError(f"{case['name']} opened")
    return vectors, cases


def contexts() -> list[dict[str, Any]]:
    examples: list[dict[str, str]] = [
        {},
        {"a": "bc"},
        {"ab": "c"},
        {"b": "2", "a": "1"},
        {"é": "1", "z": "2"},  # sorted by UTF-8 bytes: "z" (7a) before "é" (c3 a9)
        {"k": ""},
    ]
    return [{"context": c, "encoding": canonical(c).hex()} for c in examples]


# --- audit journal, chain, checkpoint, archive ---------------------------------------------


def records() -> list[dict[str, Any]]:
    base: dict[str, Any] = {
        "action": "kms:GenerateDataKey",
        "caller": {"gid": 1000, "uid": 1000, "user": "alice"},
        "encryption_context": {"envfs:file": "f1", "envfs:volume": "v1"},
        "key_arn": f"arn:envfs:kms:{REGION}:111122223333:key/{KEY_ID}",
        "operation": "GenerateDataKey",
        "outcome": "Success",
        "request": {"AuditNote": "/srv/backing/a.txt", "KeySpec": "AES_256"},
        "time": 1700000000.25,
    }
    denied = dict(base, outcome="AccessDeniedException", time=1700000001.5)
    denied["caller"] = {"gid": 1001, "uid": 1001, "user": None}
    denied["message"] = 'user uid 1001 is not authorized (\u00e9t\u00e9, "quoted")'
    system = {
        "action": None,
        "caller": {"gid": None, "uid": None, "user": "envfs-kms"},
        "key_arn": base["key_arn"],
        "operation": "RotateKey",
        "outcome": "Success",
        "time": 1700000002.0,
    }
    return [base, denied, system]


def record_text(record: dict[str, Any], seq: int | None) -> str:
    full = dict(record) if seq is None else {"seq": seq, **record}
    return json.dumps(full, sort_keys=True, separators=(",", ":"))


def journal_vectors(root_key: bytes) -> dict[str, Any]:
    key = hkdf(root_key, SUBKEY_INFOS["audit_journal"])
    name = JOURNAL_NAME.encode()
    data = b""
    entries = []
    for record in records():
        body = record_text(record, None).encode()
        offset = len(data)
        tag = mac(key, b"envfs-kms v1 audit journal" + u32(len(name)) + name + u64(offset) + body)
        frame = u32(len(body)) + body + tag
        entries.append({"offset": offset, "text": body.decode(), "tag": tag.hex()})
        data += frame
        # envfs encodes and tags it the same way
        assert audit.EncodedRecord(record).text.encode() == body
        assert journal._tag(key, JOURNAL_NAME, offset, body) == tag
    first = entries[1]["offset"]
    cases = [
        ("whole", data, 0, 3, len(data), False),
        ("from-the-second-record", data, first, 2, len(data), False),
        ("torn-at-the-end", data[:-5], 0, 2, entries[2]["offset"], False),
        ("flipped-byte-in-the-second", flipped(data, first + 10), 0, 1, first, True),
        ("record-moved-up", data[first:], 0, 0, 0, True),
        ("first-record-copied-to-the-end", data + data[:first], 0, 3, len(data), True),
        ("shorter-than-a-frame", data[:20], 0, 0, 0, False),
    ]
    for case_name, raw, start, count, end, damaged in cases:
        found, stop = journal.read_records(key, JOURNAL_NAME, raw, start)
        assert (len(found), stop, journal.damaged_at(raw, stop)) == (count, end, damaged), case_name
    renamed, _ = journal.read_records(key, "audit-journal-fedcba9876543210.log", data)
    assert renamed == []
    return {
        "key": key.hex(),
        "file_name": JOURNAL_NAME,
        "records": entries,
        "file": data.hex(),
        "reads": [
            {
                "name": case_name,
                "file_name": JOURNAL_NAME,
                "data": raw.hex(),
                "start": start,
                "records": count,
                "end": end,
                "damaged": damaged,
            }
            for case_name, raw, start, count, end, damaged in cases
        ]
        + [
            {
                "name": "renamed-file",
                "file_name": "audit-journal-fedcba9876543210.log",
                "data": data.hex(),
                "start": 0,
                "records": 0,
                "end": 0,
                "damaged": True,
            }
        ],
    }


def anchor(key: bytes, label: bytes, seq: int, chain: bytes) -> bytes:
    return u64(seq) + chain + mac(key, label + u64(seq) + chain)


def chain_vectors(root_key: bytes, tmp: Path) -> dict[str, Any]:
    key = hkdf(root_key, SUBKEY_INFOS["audit_chain"])
    prev = bytes(32)
    chain = []
    for seq, record in enumerate(records(), 1):
        text = record_text(record, seq)
        prev = mac(key, prev + u64(seq) + text.encode())
        chain.append({"seq": seq, "record": record, "text": text, "mac": prev.hex()})
        assert audit.EncodedRecord(record).with_seq(seq) == text
    macs = [bytes.fromhex(c["mac"]) for c in chain]
    head = anchor(key, b"head", 3, macs[2])
    checkpoint_0 = anchor(key, b"checkpoint", 0, bytes(32))
    checkpoint_2 = anchor(key, b"checkpoint", 2, macs[1])

    # envfs's AuditLog, on the two tables it uses, gives the same rows and anchors.
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
    conn.execute("CREATE TABLE audit (seq INTEGER PRIMARY KEY, record TEXT NOT NULL, mac BLOB)")
    log = audit.AuditLog(conn, key)
    log.write_head(0, bytes(32))
    log.write_checkpoint(0, bytes(32))
    assert conn.execute("SELECT value FROM meta WHERE name='audit_checkpoint'").fetchone() == (
        checkpoint_0,
    )
    for record in records():
        log.append(record)
    stored = conn.execute("SELECT seq, record, mac FROM audit ORDER BY seq").fetchall()
    assert [(s, t, m.hex()) for s, t, m in stored] == [
        (c["seq"], c["text"], c["mac"]) for c in chain
    ]
    assert conn.execute("SELECT value FROM meta WHERE name='audit_head'").fetchone() == (head,)

    # The archive of records 1 and 2, as envfs writes it, and the checkpoint after it.
    header = {
        "kind": "pruned",
        "region": REGION,
        "account": "111122223333",
        "created": 1700000003.0,
        "start": archive.anchor_json(key, b"checkpoint", audit.Anchor(0, bytes(32))),
    }
    end = audit.Anchor(2, macs[1])
    path = tmp / "archive.jsonl"
    rows = [(c["seq"], c["text"].encode(), bytes.fromhex(c["mac"])) for c in chain[:2]]
    archive.write(path, header, rows, archive.anchor_json(key, b"checkpoint", end))
    log.cut(end)
    assert conn.execute("SELECT value FROM meta WHERE name='audit_checkpoint'").fetchone() == (
        checkpoint_2,
    )
    assert log.verify() == audit.Verification(1, 2, None)
    lines = path.read_text().splitlines()
    expected_start = {"label": "checkpoint", "seq": 0, "mac": "00" * 32}
    assert {k: v for k, v in json.loads(lines[0])["start"].items() if k != "tag"} == expected_start
    assert json.loads(lines[0])["start"]["tag"] == checkpoint_0[40:].hex()
    assert archive.verify(path, key).problem is None
    return {
        "key": key.hex(),
        "records": chain,
        "head": head.hex(),
        "checkpoint_initial": checkpoint_0.hex(),
        "checkpoint_after_archiving_2": checkpoint_2.hex(),
        "archive_of_records_1_and_2": lines,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=HERE / "kms-v1.json")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args()
    if args.output.exists() and not args.force:
        print(f"make_kms_vectors: error: {args.output} exists; golden vectors are made once")
        return 1

    root_key = label_bytes("root key", 32)
    material_v1 = label_bytes("material v1", 32)
    material_v2 = label_bytes("material v2", 32)
    vectors, broken = blobs(material_v1, material_v2)
    with tempfile.TemporaryDirectory() as tmp:
        chain = chain_vectors(root_key, Path(tmp))
    document = {
        "description": (
            "envfs key service golden vectors, format version 1 (docs/kms.md §6 ciphertext"
            " blobs, §7 root key and sealing, §8 audit journal, chain, checkpoint and"
            " archives). Made once by tests/golden/make_kms_vectors.py from the"
            " specification with cryptography and the standard library; tests read them,"
            " never regenerate them. Every 'blobs' entry must open to its plaintext and"
            " every 'broken_blobs' entry be refused with its error, at its stage, when"
            " opened with the material, region and context of 'open_as' (or the ones it"
            " names). All byte strings are hex."
        ),
        "blob_version": 1,
        "root_key": derivations(root_key),
        "sealed_material": [
            sealed_material(root_key, 1, material_v1),
            sealed_material(root_key, 2, material_v2),
        ],
        "root_check": root_check(root_key),
        "contexts": contexts(),
        "blobs": vectors,
        "broken_blobs": broken,
        "journal": journal_vectors(root_key),
        "audit_chain": chain,
    }
    args.output.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
