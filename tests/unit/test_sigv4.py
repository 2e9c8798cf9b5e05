"""The SigV4 verifier against botocore's own signer, AWS's published vector, and tampering."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from unittest import mock
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from envfs import errors
from envfs.kms import sigv4
from envfs.kms.sigv4 import (
    IncompleteSignatureException,
    InvalidSignatureException,
    MissingAuthenticationTokenException,
    ReplayCache,
    SignedRequest,
    UnrecognizedClientException,
)

AKID = "AKIAENVFSTESTKEY0001"
SECRET = "s3cr3t/EnvfsTestSecretAccessKey+0123456789"
OTHER_AKID = "AKIAENVFSTESTKEY0002"
OTHER_SECRET = "another/EnvfsTestSecretAccessKey+9876543"
REGION = "eu-west-1"
HOST = f"kms.{REGION}.amazonaws.com"
SIGNED_AT = dt.datetime(2026, 3, 14, 15, 9, 26, tzinfo=dt.UTC)
BODY = json.dumps({"KeyId": "alias/test", "Plaintext": "aGVsbG8="}).encode()

SECRETS = {AKID: SECRET.encode(), OTHER_AKID: OTHER_SECRET.encode()}


def secret_for(akid: str) -> bytes | None:
    return SECRETS.get(akid)


def sign(
    *,
    method: str = "POST",
    path: str = "/",
    query: str = "",
    headers: dict[str, str] | None = None,
    body: bytes = BODY,
    akid: str = AKID,
    secret: str = SECRET,
    token: str | None = None,
    region: str = REGION,
    service: str = "kms",
    at: dt.datetime = SIGNED_AT,
) -> SignedRequest:
    """A request signed by botocore, as a server receives it (with its Host header)."""
    url = f"https://{HOST}{path}" + (f"?{query}" if query else "")
    if headers is None:
        headers = {
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "TrentService.Encrypt",
        }
    request = AWSRequest(method=method, url=url, headers=dict(headers), data=body)
    naive_utc = at.astimezone(dt.UTC).replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=naive_utc):
        SigV4Auth(Credentials(akid, secret, token), service, region).add_auth(request)
    prepared = request.prepare()
    parts = urlsplit(prepared.url)
    sent = [("Host", HOST), *((k, v) for k, v in prepared.headers.items())]
    return SignedRequest(
        method=prepared.method,
        path=parts.path,
        query=parts.query,
        headers=sent,
        body=prepared.body or b"",
    )


def check(request: SignedRequest, **kwargs: object) -> str:
    options: dict[str, object] = {"region": REGION, "now": SIGNED_AT}
    options.update(kwargs)
    return sigv4.verify(request, secret_for, **options)  # type: ignore[arg-type]


def with_header(request: SignedRequest, name: str, value: str) -> SignedRequest:
    """``request`` with every ``name`` header's value replaced (or the header added)."""
    kept = [(n, v) for n, v in request.headers if n.lower() != name.lower()]
    return dataclasses.replace(request, headers=[*kept, (name, value)])


def without_header(request: SignedRequest, name: str) -> SignedRequest:
    kept = [(n, v) for n, v in request.headers if n.lower() != name.lower()]
    return dataclasses.replace(request, headers=kept)


def authorization(request: SignedRequest) -> str:
    (value,) = request.header_values("Authorization")
    return value


def with_authorization(request: SignedRequest, change: Callable[[str], str]) -> SignedRequest:
    return with_header(request, "Authorization", change(authorization(request)))


# --- agreeing with botocore and AWS ------------------------------------------------------


def test_a_kms_request_signed_by_botocore_verifies() -> None:
    request = sign()
    assert request.header_values("X-Amz-Target") == ["TrentService.Encrypt"]
    assert check(request) == AKID


def test_the_other_key_verifies_as_itself() -> None:
    assert check(sign(akid=OTHER_AKID, secret=OTHER_SECRET)) == OTHER_AKID


def test_aws_get_vanilla_vector() -> None:
    # AWS's SigV4 test suite, get-vanilla.
    request = SignedRequest(
        method="GET",
        path="/",
        headers=[
            ("Host", "example.amazonaws.com"),
            ("X-Amz-Date", "20150830T123600Z"),
            (
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/"
                "aws4_request, SignedHeaders=host;x-amz-date, Signature="
                "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            ),
        ],
    )
    example = {"AKIDEXAMPLE": b"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"}
    now = dt.datetime(2015, 8, 30, 12, 36, tzinfo=dt.UTC)
    got = sigv4.verify(request, example.get, region="us-east-1", service="service", now=now)
    assert got == "AKIDEXAMPLE"
    tampered = with_header(request, "Host", "example.amazonaws.co")
    with pytest.raises(InvalidSignatureException, match=r"^The request signature we"):
        sigv4.verify(tampered, example.get, region="us-east-1", service="service", now=now)


def test_botocore_agrees_with_the_get_vanilla_vector() -> None:
    request = AWSRequest(method="GET", url="https://example.amazonaws.com/")
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    with mock.patch(
        "botocore.auth.get_current_datetime", return_value=dt.datetime(2015, 8, 30, 12, 36)
    ):
        SigV4Auth(credentials, "service", "us-east-1").add_auth(request)
    assert request.headers["Authorization"].endswith(
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    )


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/", ""),
        ("", ""),
        ("/a/b", ""),
        ("/a/b/", ""),
        ("/a%20b/c%2Fd", ""),
        ("/a/./b/../c", ""),
        ("//double//slashes", ""),
        ("/~user/ünïcode", ""),
        ("/", "b=2&a=1&a=0&c=x%20y&d=&e"),
        ("/", "k=a%2Bb&k2=~&sp=a%20b%2F"),
    ],
)
def test_paths_and_queries_canonicalized_as_botocore_does(path: str, query: str) -> None:
    assert check(sign(method="GET", path=path, query=query, body=b"")) == AKID


def test_a_query_is_decoded_and_encoded_again_as_aws_specifies() -> None:
    # botocore sends only queries already encoded this way, and signs them as sent.
    assert sigv4.canonical_query("b=%7e&a=x+y&c&a=%41") == "a=A&a=x%2By&b=~&c="


def test_a_date_header_instead_of_x_amz_date() -> None:
    request = sign(headers={"Date": "x", "X-Amz-Target": "TrentService.Encrypt"})
    assert request.header_values("X-Amz-Date") == []
    assert check(request) == AKID


def test_a_matching_content_sha256_header_is_accepted_and_a_wrong_one_refused() -> None:
    good = {"X-Amz-Content-Sha256": hashlib.sha256(BODY).hexdigest()}
    assert check(sign(headers=good)) == AKID
    with pytest.raises(InvalidSignatureException, match=r"^X-Amz-Content-Sha256 does not match"):
        check(sign(headers={"X-Amz-Content-Sha256": "0" * 64}))


# --- tampering ---------------------------------------------------------------------------

BAD = r"^The request signature we calculated does not match the signature you provided\."


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda r: dataclasses.replace(r, method="PUT"), id="method"),
        pytest.param(lambda r: dataclasses.replace(r, path="/x"), id="path"),
        pytest.param(lambda r: dataclasses.replace(r, query="a=1"), id="query"),
        pytest.param(lambda r: dataclasses.replace(r, body=r.body + b" "), id="body"),
        pytest.param(lambda r: with_header(r, "Host", "kms.example.com"), id="host"),
        pytest.param(lambda r: with_header(r, "Content-Type", "text/plain"), id="content-type"),
        pytest.param(
            lambda r: with_header(r, "X-Amz-Target", "TrentService.Decrypt"), id="x-amz-target"
        ),
        pytest.param(lambda r: with_header(r, "X-Amz-Date", "20260314T150927Z"), id="date"),
        pytest.param(
            lambda r: with_authorization(r, lambda a: a.replace(AKID, OTHER_AKID)),
            id="access-key-id-of-another-known-key",
        ),
        pytest.param(
            lambda r: with_authorization(r, lambda a: a[:-1] + ("0" if a[-1] != "0" else "1")),
            id="signature-last-digit",
        ),
        pytest.param(
            lambda r: with_authorization(
                r, lambda a: a.replace("Signature=", "Signature=" + "f", 1)[:-1]
            ),
            id="signature-first-digit",
        ),
        pytest.param(
            lambda r: with_authorization(r, lambda a: a.replace("content-type;host;", "host;", 1)),
            id="signed-headers-list",
        ),
    ],
)
def test_each_tampered_part_is_refused(tamper: Callable[[SignedRequest], SignedRequest]) -> None:
    request = sign()
    assert check(request) == AKID
    with pytest.raises(InvalidSignatureException, match=BAD) as caught:
        check(tamper(request))
    assert (caught.value.name, caught.value.status) == ("InvalidSignatureException", 400)
    signature = authorization(request).rsplit("=", 1)[1]
    assert signature not in str(caught.value)
    assert SECRET not in str(caught.value)


def test_the_signed_content_type_header_is_in_the_signature() -> None:
    auth = authorization(sign())
    assert "SignedHeaders=content-type;host;x-amz-date;x-amz-target," in auth


@pytest.mark.parametrize(
    ("signed_with", "message"),
    [
        (
            {"region": "us-east-1"},
            r"^Credential should be scoped to a valid region: 'eu-west-1', not 'us-east-1'\.$",
        ),
        ({"service": "s3"}, r"^Credential should be scoped to correct service: 'kms', not 's3'\.$"),
    ],
)
def test_a_credential_scoped_elsewhere_is_refused(
    signed_with: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidSignatureException, match=message):
        check(sign(**signed_with))  # type: ignore[arg-type]


def test_the_server_region_must_be_the_scope_region() -> None:
    with pytest.raises(InvalidSignatureException, match=r"valid region: 'us-east-2'"):
        check(sign(), region="us-east-2")


def test_a_scope_date_other_than_the_request_date_is_refused() -> None:
    request = with_authorization(sign(), lambda a: a.replace("/20260314/", "/20260313/"))
    with pytest.raises(
        InvalidSignatureException,
        match=r"^Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date"
        r" from HTTP: '20260313' != '20260314', from '20260314T150926Z'\.$",
    ):
        check(request)


def test_a_request_date_on_another_day_than_the_scope_is_refused() -> None:
    request = with_header(sign(), "X-Amz-Date", "20260315T150926Z")
    with pytest.raises(InvalidSignatureException, match=r"^Date in Credential scope"):
        check(request, now=dt.datetime(2026, 3, 15, 15, 9, 26, tzinfo=dt.UTC))


def test_a_wrong_terminator_is_refused() -> None:
    request = with_authorization(sign(), lambda a: a.replace("aws4_request", "aws5_request"))
    with pytest.raises(InvalidSignatureException, match=r"valid terminator: 'aws4_request'"):
        check(request)


def test_an_unknown_access_key_id_is_unrecognized() -> None:
    with pytest.raises(
        UnrecognizedClientException,
        match=r"^The security token included in the request is invalid\.$",
    ) as caught:
        check(sign(akid="AKIAUNKNOWN000000000"))
    assert (caught.value.name, caught.value.status) == ("UnrecognizedClientException", 400)


def test_a_session_token_is_refused() -> None:
    request = sign(token="FQoGZXIvYXdzEXAMPLETOKEN")
    assert "x-amz-security-token" in authorization(request)
    with pytest.raises(
        UnrecognizedClientException,
        match=r"^The security token included in the request is invalid\. envfs issues no"
        r" temporary credentials: send no X-Amz-Security-Token$",
    ) as caught:
        check(request)
    assert "FQoGZXIv" not in str(caught.value)


# --- headers -----------------------------------------------------------------------------


def test_unsigned_extra_headers_do_not_matter() -> None:
    request = sign()
    extra = [*request.headers, ("User-Agent", "curl/8"), ("X-Forwarded-For", "10.0.0.1")]
    assert check(dataclasses.replace(request, headers=extra)) == AKID


def test_an_unsigned_x_amz_header_is_refused() -> None:
    request = with_header(sign(), "X-Amz-Meta-Extra", "1")
    with pytest.raises(
        InvalidSignatureException,
        match=r"^x-amz-\* headers must be signed; not in SignedHeaders: x-amz-meta-extra$",
    ):
        check(request)


def test_header_name_case_does_not_matter() -> None:
    request = sign()
    for change in (str.lower, str.upper, str.swapcase):
        renamed = [(change(n), v) for n, v in request.headers]
        assert check(dataclasses.replace(request, headers=renamed)) == AKID


def test_header_values_are_trimmed_and_inner_whitespace_folded() -> None:
    request = sign(headers={"X-Amz-Target": "  TrentService.Encrypt", "X-Custom": "a   b\t c "})
    assert check(request) == AKID
    refolded = with_header(request, "X-Custom", "a b c")
    refolded = with_header(refolded, "X-Amz-Target", "TrentService.Encrypt   ")
    assert check(refolded) == AKID
    with pytest.raises(InvalidSignatureException, match=BAD):
        check(with_header(request, "X-Custom", "ab c"))


class _CountedHeaders(list[tuple[str, str]]):
    """Header pairs that count how often they are read through."""

    reads = 0

    def __iter__(self) -> Iterator[tuple[str, str]]:
        self.reads += 1
        return super().__iter__()


def _header_reads_to_verify(extra_headers: int) -> int:
    headers = {
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": "TrentService.Encrypt",
        **{f"X-Amz-Extra-{n}": "v" for n in range(extra_headers)},
    }
    request = sign(headers=headers)
    counted = _CountedHeaders(request.headers)
    assert check(dataclasses.replace(request, headers=counted)) == AKID
    return counted.reads


def test_the_headers_are_read_as_often_however_many_are_signed() -> None:
    # Reading them once per signed header made a head of a thousand signed headers cost
    # the worker a second, for anyone who knows an access key id.
    assert _header_reads_to_verify(500) == _header_reads_to_verify(0)


def test_a_signed_header_that_is_missing_is_refused() -> None:
    with pytest.raises(
        InvalidSignatureException,
        match=r"^SignedHeaders names headers the request does not have: content-type$",
    ):
        check(without_header(sign(), "Content-Type"))


def test_host_must_be_signed() -> None:
    request = with_authorization(sign(), lambda a: a.replace("host;", "", 1))
    with pytest.raises(InvalidSignatureException, match=r"^'Host' must be a signed header"):
        check(request)


# --- malformed ---------------------------------------------------------------------------


def test_no_authorization_header() -> None:
    with pytest.raises(
        MissingAuthenticationTokenException, match=r"^Missing Authentication Token$"
    ) as caught:
        check(without_header(sign(), "Authorization"))
    assert (caught.value.name, caught.value.status) == ("MissingAuthenticationTokenException", 403)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda a: a.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA512"),
            r"^Unsupported AWS 'algorithm'",
        ),
        (lambda a: a.split(", Signature=")[0], r"^Authorization header requires 'Signature'"),
        (lambda a: a.replace("Credential=", "Cred="), r"unknown part 'Cred'"),
        (lambda a: a.replace(f"{AKID}/", ""), r"Credential must be ACCESS_KEY_ID/YYYYMMDD"),
        (lambda a: a.replace("content-type;host", "host;content-type"), r"must be sorted"),
        (lambda a: a.replace("content-type;", "Content-Type;"), r"must be lowercase header names"),
        (lambda a: a + "x", r"^Signature must be 64 lowercase hex digits$"),
        (lambda a: a + ", Signature=" + "0" * 64, r"repeats 'Signature'"),
        (lambda a: a.replace(", SignedHeaders", " SignedHeaders"), r"Authorization header"),
    ],
)
def test_a_malformed_authorization_header_is_incomplete(
    change: Callable[[str], str], message: str
) -> None:
    with pytest.raises(IncompleteSignatureException, match=message) as caught:
        check(with_authorization(sign(), change))
    assert (caught.value.name, caught.value.status) == ("IncompleteSignatureException", 400)


@pytest.mark.parametrize("part", ["Signature:{}", "Signature{}=x"])
def test_a_malformed_part_is_quoted_by_its_start_only(part: str) -> None:
    # These messages are logged: a part that holds a signature must not hold it whole.
    request = sign()
    signature = authorization(request).rsplit("Signature=", 1)[1]
    malformed = with_authorization(
        request, lambda a: a.replace(f"Signature={signature}", part.format(signature))
    )
    with pytest.raises(IncompleteSignatureException, match=r"'Signature.{7}\.\.\.'") as caught:
        check(malformed)
    assert signature[:8] not in caught.value.message


def test_no_date_header_is_incomplete() -> None:
    with pytest.raises(IncompleteSignatureException, match=r"either a 'X-Amz-Date' or a 'Date'"):
        check(without_header(sign(), "X-Amz-Date"))


def test_a_malformed_x_amz_date_is_incomplete() -> None:
    with pytest.raises(IncompleteSignatureException, match=r"^X-Amz-Date '2026-03-14' is not"):
        check(with_header(sign(), "X-Amz-Date", "2026-03-14"))


@pytest.mark.parametrize(
    "date",
    [
        "Fri, 31 Dec 9999 23:59:59 -2359",  # past the calendar's end in UTC
        "Fri, 1 Jan 99999999999999999999 00:00:00 GMT",  # a year no C long holds
        "Mon, 32 Jan 2026 00:00:00 GMT",
    ],
)
def test_a_date_header_off_the_calendar_is_incomplete(date: str) -> None:
    request = without_header(with_header(sign(), "Date", date), "X-Amz-Date")
    with pytest.raises(IncompleteSignatureException, match=r"^Date '.*' is not an HTTP date$"):
        check(request)


# --- time --------------------------------------------------------------------------------


def test_clock_skew_up_to_five_minutes_either_way_is_accepted() -> None:
    request = sign()
    for seconds in (-300, -1, 0, 1, 300):
        assert check(request, now=SIGNED_AT + dt.timedelta(seconds=seconds)) == AKID


def test_a_signature_older_than_five_minutes_has_expired() -> None:
    with pytest.raises(
        InvalidSignatureException,
        match=r"^Signature expired: 20260314T150926Z is now earlier than 20260314T150927Z"
        r" \(20260314T151427Z - 5 min\.\)$",
    ):
        check(sign(), now=SIGNED_AT + dt.timedelta(seconds=301))


def test_a_signature_more_than_five_minutes_ahead_is_not_yet_current() -> None:
    with pytest.raises(
        InvalidSignatureException,
        match=r"^Signature not yet current: 20260314T150926Z is still later than"
        r" 20260314T150925Z \(20260314T150425Z \+ 5 min\.\)$",
    ):
        check(sign(), now=SIGNED_AT - dt.timedelta(seconds=301))


def test_a_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match=r"^now must be an aware datetime$"):
        check(sign(), now=SIGNED_AT.replace(tzinfo=None))


# --- replays -----------------------------------------------------------------------------


def test_a_replay_is_refused_only_with_a_cache() -> None:
    request = sign()
    assert check(request) == AKID
    assert check(request) == AKID
    cache = ReplayCache()
    assert check(request, replay_cache=cache) == AKID
    with pytest.raises(
        InvalidSignatureException,
        match=r"^Signature already used: this request was replayed \(signed at 20260314T150926Z\)",
    ):
        check(request, replay_cache=cache, now=SIGNED_AT + dt.timedelta(seconds=299))
    with pytest.raises(InvalidSignatureException, match=r"replayed"):
        check(request, replay_cache=cache, now=SIGNED_AT + dt.timedelta(seconds=300))
    with pytest.raises(InvalidSignatureException, match=r"^Signature expired"):
        check(request, replay_cache=cache, now=SIGNED_AT + dt.timedelta(seconds=301))
    assert check(sign(body=b"{}"), replay_cache=cache) == AKID


def test_a_refused_request_is_not_remembered() -> None:
    request = sign()
    cache = ReplayCache()
    with pytest.raises(InvalidSignatureException, match=BAD):
        check(dataclasses.replace(request, body=b"{}"), replay_cache=cache)
    assert len(cache) == 0
    assert check(request, replay_cache=cache) == AKID


def test_the_replay_cache_forgets_expired_signatures() -> None:
    cache = ReplayCache()
    assert cache.check_and_add("a", expires_at=100.0, now=0.0)
    assert not cache.check_and_add("a", expires_at=100.0, now=99.0)
    assert not cache.check_and_add("a", expires_at=100.0, now=100.0)
    assert cache.check_and_add("b", expires_at=300.0, now=150.0)
    assert len(cache) == 1
    assert cache.check_and_add("a", expires_at=400.0, now=150.0)


def test_the_replay_cache_drops_the_oldest_at_its_bound_and_never_takes_it_again() -> None:
    cache = ReplayCache(max_entries=2)
    for sig, expiry in (("a", 1000.0), ("b", 1001.0), ("c", 1002.0)):
        assert cache.check_and_add(sig, expires_at=expiry, now=0.0)
    assert len(cache) == 2
    assert cache.admit("c", expires_at=1002.0, now=1.0) == "replayed"
    assert cache.admit("b", expires_at=1001.0, now=1.0) == "replayed"
    # "a" is forgotten, but its owner's signatures expiring no later are refused from now on
    assert cache.admit("a", expires_at=1000.0, now=1.0) == "forgotten"
    assert cache.admit("new, as old", expires_at=1000.0, now=1.0) == "forgotten"
    assert cache.admit("new", expires_at=1003.0, now=1.0) is None
    assert len(cache) == 2


def test_a_forgotten_signature_s_floor_goes_once_it_has_expired() -> None:
    cache = ReplayCache(max_entries=1)
    assert cache.check_and_add("a", expires_at=100.0, now=0.0)
    assert cache.check_and_add("b", expires_at=200.0, now=0.0)  # forgets "a"
    assert cache.admit("late", expires_at=100.0, now=50.0) == "forgotten"
    assert cache.check_and_add("c", expires_at=300.0, now=150.0)  # "b" forgotten too
    assert cache._forgotten_until == {"": 200.0}
    assert cache.check_and_add("d", expires_at=400.0, now=250.0)
    assert cache._forgotten_until == {"": 300.0}


def test_a_flood_of_one_key_s_signatures_does_not_push_out_another_key_s() -> None:
    cache = ReplayCache(max_entries=3)
    assert cache.check_and_add("victim", expires_at=1000.0, now=0.0, owner=OTHER_AKID)
    for n in range(100):
        assert cache.check_and_add(f"flood{n}", expires_at=1000.0 + n, now=1.0, owner=AKID)
    assert len(cache) == 3
    assert cache.admit("victim", expires_at=1000.0, now=2.0, owner=OTHER_AKID) == "replayed"
    assert cache.admit("flood99", expires_at=1099.0, now=2.0, owner=AKID) == "replayed"
    assert cache.admit("flood0", expires_at=1000.0, now=2.0, owner=AKID) == "forgotten"
    assert cache.admit("other's new", expires_at=1000.0, now=2.0, owner=OTHER_AKID) is None


def test_a_replay_is_refused_after_another_key_filled_the_cache() -> None:
    cache = ReplayCache(max_entries=2)
    captured = sign()
    assert check(captured, replay_cache=cache) == AKID
    for seconds in range(1, 4):
        later = SIGNED_AT + dt.timedelta(seconds=seconds)
        flood = sign(akid=OTHER_AKID, secret=OTHER_SECRET, at=later)
        assert check(flood, replay_cache=cache, now=later) == OTHER_AKID
    with pytest.raises(InvalidSignatureException, match=r"replayed"):
        check(captured, replay_cache=cache, now=SIGNED_AT + dt.timedelta(seconds=4))


def test_a_replay_is_refused_after_its_own_key_filled_the_cache() -> None:
    cache = ReplayCache(max_entries=2)
    captured = sign()
    assert check(captured, replay_cache=cache) == AKID
    for seconds in range(1, 4):
        later = SIGNED_AT + dt.timedelta(seconds=seconds)
        assert check(sign(at=later, body=b"{}"), replay_cache=cache, now=later) == AKID
    with pytest.raises(
        InvalidSignatureException,
        match=r"^Signature too old to be told from a replay \(signed at 20260314T150926Z,",
    ):
        check(captured, replay_cache=cache, now=SIGNED_AT + dt.timedelta(seconds=4))


def test_the_replay_cache_needs_room() -> None:
    with pytest.raises(ValueError, match=r"^max_entries must be at least 1, not 0$"):
        ReplayCache(max_entries=0)


def test_an_expired_signature_behind_a_live_one_is_not_a_replay() -> None:
    cache = ReplayCache()
    assert cache.check_and_add("live", expires_at=1000.0, now=0.0)
    assert cache.check_and_add("short", expires_at=100.0, now=0.0)
    assert cache.check_and_add("short", expires_at=500.0, now=200.0)


def test_the_method_is_signed_in_upper_case_as_botocore_does() -> None:
    request = sign()
    assert check(dataclasses.replace(request, method="post")) == AKID


def test_a_date_header_is_gmt_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    request = sign(headers={"Date": "x", "X-Amz-Target": "TrentService.Encrypt"})
    assert request.header_values("Date")[0].endswith("-0000")
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert check(request) == AKID
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (MissingAuthenticationTokenException, 403),
        (IncompleteSignatureException, 400),
        (UnrecognizedClientException, 400),
        (InvalidSignatureException, 400),
    ],
)
def test_the_errors_are_key_service_errors_known_by_their_aws_names(
    cls: type[sigv4.SignatureAuthError], status: int
) -> None:
    rebuilt = errors.KMSError.from_wire(cls.__name__, "m")
    assert type(rebuilt) is cls
    assert (rebuilt.name, rebuilt.status, rebuilt.exit_code) == (cls.__name__, status, 12)


@pytest.mark.parametrize("name", ["Authorization", "X-Amz-Date"])
def test_a_repeated_authorization_or_date_header_is_incomplete(name: str) -> None:
    request = sign()
    (value,) = request.header_values(name)
    repeated = dataclasses.replace(request, headers=[*request.headers, (name, value)])
    with pytest.raises(IncompleteSignatureException, match=rf"^more than one {name} header$"):
        check(repeated)


def test_a_repeat_within_the_grace_of_the_first_use_is_accepted() -> None:
    cache = sigv4.ReplayCache(repeat_grace=2.0)
    assert cache.check_and_add("a" * 64, 400.0, 100.0)
    assert cache.check_and_add("a" * 64, 400.0, 101.5)  # the same call again in its second
    assert cache.check_and_add("a" * 64, 400.0, 101.99)
    assert not cache.check_and_add("a" * 64, 400.0, 102.0)  # measured from the first use
    strict = sigv4.ReplayCache()
    assert strict.check_and_add("b" * 64, 400.0, 100.0)
    assert not strict.check_and_add("b" * 64, 400.0, 100.0)


@pytest.mark.parametrize("grace", [-0.1, 300.1])
def test_a_repeat_grace_outside_the_skew_window_is_refused(grace: float) -> None:
    with pytest.raises(ValueError, match="repeat_grace"):
        sigv4.ReplayCache(repeat_grace=grace)
