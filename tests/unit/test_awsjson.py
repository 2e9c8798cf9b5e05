"""AWS KMS's JSON 1.1 protocol (``envfs.kms.awsjson``) checked against botocore, the AWS SDK's
own serializer and parser for KMS (its service model ``kms``), over a real key service."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore import parsers, serialize

from envfs.errors import KMSError
from envfs.identity import Caller
from envfs.kms.awsjson import CONTENT_TYPE, WireError, encode_error, encode_result, parse_request
from envfs.kms.operations import OPERATIONS, ParamType
from envfs.kms.service import KeyService
from envfs.kms.store import KeyStore

ROOT = Caller(0, 0, frozenset({0}), "root", frozenset({"root"}))
MODEL = botocore.session.get_session().get_service_model("kms")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[KeyService]:
    svc = KeyService(KeyStore.init(tmp_path / "local-1", "local-1"))
    yield svc
    svc.close()


def call(service: KeyService, operation: str, **params: Any) -> dict[str, Any]:
    """``operation`` as boto3 would send it, answered by the key service through the JSON
    1.1 mapping, and read back by botocore's own parser (errors as ``{"Error": ...}``)."""
    request = serialize.create_serializer("json").serialize_to_request(
        params, MODEL.operation_model(operation)
    )
    assert request["headers"]["Content-Type"] == CONTENT_TYPE
    try:
        name, decoded = parse_request(request["headers"]["X-Amz-Target"], request["body"])
        status, body = 200, encode_result(service.handle(ROOT, name, decoded))
    except (KMSError, WireError) as exc:
        status, body = encode_error(exc)
    parser = parsers.create_parser("json")
    response = {"status_code": status, "headers": {}, "body": body}
    parsed: dict[str, Any] = parser.parse(response, MODEL.operation_model(operation).output_shape)
    parsed.pop("ResponseMetadata", None)
    return parsed


def test_the_origin_document_s_verbs_round_trip_as_boto3_sees_them(service: KeyService) -> None:
    key = call(service, "CreateKey", Description="json 1.1")["KeyMetadata"]
    assert key["Description"] == "json 1.1" and key["KeyState"] == "Enabled"
    assert key["CreationDate"].year >= 2026  # a timestamp botocore understood
    sealed = call(
        service,
        "Encrypt",
        KeyId=key["KeyId"],
        Plaintext=b"\x00secret\xff",
        EncryptionContext={"purpose": "test"},
    )
    assert isinstance(sealed["CiphertextBlob"], bytes) and sealed["KeyId"] == key["Arn"]
    opened = call(
        service,
        "Decrypt",
        CiphertextBlob=sealed["CiphertextBlob"],
        EncryptionContext={"purpose": "test"},
    )
    assert opened["Plaintext"] == b"\x00secret\xff"
    data_key = call(service, "GenerateDataKey", KeyId=key["KeyId"], KeySpec="AES_256")
    assert len(data_key["Plaintext"]) == 32
    moved = call(service, "ReEncrypt", CiphertextBlob=data_key["CiphertextBlob"],
                 DestinationKeyId=key["KeyId"])  # fmt: skip
    again = call(service, "Decrypt", CiphertextBlob=moved["CiphertextBlob"])
    assert again["Plaintext"] == data_key["Plaintext"]


def test_errors_carry_aws_names_that_botocore_reads(service: KeyService) -> None:
    missing = call(service, "DescribeKey", KeyId="alias/nothing")
    assert missing["Error"]["Code"] == "NotFoundException"
    assert "alias/nothing" in missing["Error"]["Message"]
    bad = call(service, "Decrypt", CiphertextBlob=b"not a blob")
    assert bad["Error"]["Code"] == "InvalidCiphertextException"
    status, _ = encode_error(KMSError("internal"))
    assert status == 500


@pytest.mark.parametrize(
    ("target", "body", "name"),
    [
        (None, b"{}", "UnknownOperationException"),
        ("Kinesis_20131202.ListStreams", b"{}", "UnknownOperationException"),
        ("TrentService.MakeCoffee", b"{}", "UnknownOperationException"),
        ("TrentService.Encrypt", b"[1]", "SerializationException"),
        ("TrentService.Encrypt", b"{", "SerializationException"),
        ("TrentService.Encrypt", b'{"KeyId":"a","KeyId":"b"}', "SerializationException"),
        ("TrentService.Encrypt", b'{"Plaintext":"not base64!"}', "SerializationException"),
        ("TrentService.Encrypt", b'{"Plaintext":7}', "SerializationException"),
        ("TrentService.Encrypt", b"\xff\xfe", "SerializationException"),
        ("TrentService.Encrypt", b'{"KeyId": NaN}', "SerializationException"),
        ("TrentService.Encrypt", b"[" * 100000 + b"]" * 100000, "SerializationException"),
        ("TrentService.Encrypt", b" " * (1 << 20) + b"{}", "SerializationException"),
    ],
)
def test_requests_that_are_not_the_protocol_s_are_refused_by_name(
    target: str | None, body: bytes, name: str
) -> None:
    with pytest.raises(WireError) as exc:
        parse_request(target, body)
    assert exc.value.aws_name == name
    status, answer = encode_error(exc.value)
    assert status == 400 and json.loads(answer)["__type"] == name


def test_an_empty_body_is_an_operation_without_parameters() -> None:
    assert parse_request("TrentService.ListKeys", b"") == ("ListKeys", {})


def test_envfs_s_parameter_types_agree_with_aws_s_model() -> None:
    """Every parameter envfs shares with AWS KMS has AWS's type; binary ones are the ones
    this mapping decodes."""
    kinds = {ParamType.BLOB: "blob", ParamType.STRING: "string", ParamType.INTEGER: "integer",
             ParamType.BOOLEAN: "boolean", ParamType.CONTEXT: "map", ParamType.TAGS: "list",
             ParamType.STRING_LIST: "list"}  # fmt: skip
    shared = 0
    for name, operation in OPERATIONS.items():
        if name not in MODEL.operation_names:
            continue  # envfs's own (audit, access keys)
        members = MODEL.operation_model(name).input_shape.members
        for param in operation.params:
            if param.name in members:
                shared += 1
                assert members[param.name].type_name == kinds[param.type], (name, param.name)
    assert shared > 30
