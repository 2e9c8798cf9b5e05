"""AWS Signature Version 4: verifying a signed request, apart from any transport.

The key service's HTTP listener hands each request here as it was received (method, raw
path and query, header pairs, body) and gets back the access key id that signed it, or
one of the errors below, named and numbered as AWS's JSON services answer them.

What is checked, in order (AWS's "Create a signed AWS API request" and botocore's
``SigV4Auth``, the signer the tests agree with):

- ``Authorization: AWS4-HMAC-SHA256 Credential=AKID/YYYYMMDD/REGION/SERVICE/aws4_request,
  SignedHeaders=a;b;c, Signature=<64 hex>``: each part present once, nothing else;
- the request time from ``X-Amz-Date`` (``YYYYMMDDTHHMMSSZ``), else from ``Date``
  (RFC 7231); the credential scope's date is that time's day, its region and service
  ours, its terminator ``aws4_request``;
- the time within :data:`MAX_SKEW` of now, either way (the boundary itself is accepted);
- the access key known (``secret_for``) and no ``X-Amz-Security-Token``: envfs issues no
  temporary credentials, so a token can only be invalid, and is answered as AWS answers
  an invalid one;
- ``SignedHeaders`` lowercase, sorted, without repeats; ``host`` and every ``x-amz-*``
  header of the request among them, and each of them present;
- ``X-Amz-Content-Sha256``, when sent, the hex SHA-256 of the body;
- the signature, recomputed and compared in constant time;
- with a :class:`ReplayCache`, a signature not accepted before.

The canonical request is as botocore builds it for services other than S3: the path with
dot segments and repeated slashes removed and percent-encoded once more (so an encoded
path is encoded twice; an empty path is ``/``); the query's pairs decoded, encoded with
AWS's unreserved set and sorted; each signed header's values trimmed, inner whitespace
runs folded to one space, repeats joined with ``,``.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import hashlib
import hmac
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import quote, unquote

from envfs import errors

ALGORITHM = "AWS4-HMAC-SHA256"
TERMINATOR = "aws4_request"
# AWS's tolerance for a request's time against the server's clock, either way.
MAX_SKEW = _dt.timedelta(minutes=5)
_AMZ_DATE = "%Y%m%dT%H%M%SZ"
_AMZ_DATE_SHAPE = re.compile(r"^\d{8}T\d{6}Z$")
_SIGNATURE_SHAPE = re.compile(r"^[0-9a-f]{64}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")


# --- errors (AWS's names for its JSON services' authentication failures) ----------------


class SignatureAuthError(errors.KMSError):
    """A request whose signature could not be accepted; nothing was done.

    ``name`` is the AWS error name (``__type`` on the wire), ``status`` the HTTP status:
    400 as AWS's JSON 1.1 services (KMS, DynamoDB, Kinesis) are seen to answer, except a
    missing token, 403 as AWS's list of common errors gives it. Messages never hold a
    secret access key, a derived key or the expected signature.
    """

    aws_name = "InvalidSignatureException"
    status: ClassVar[int] = 400
    errno = errors.AccessDeniedException.errno
    # Shares "not allowed" with AccessDeniedException: the CLI, which talks to the daemon
    # over its Unix socket, never meets these, and the documented list stays as it is.
    exit_code = errors.AccessDeniedException.exit_code

    @property
    def name(self) -> str:
        return self.aws_name


class MissingAuthenticationTokenException(SignatureAuthError):
    """No ``Authorization`` header at all."""

    aws_name = "MissingAuthenticationTokenException"
    status = 403


class IncompleteSignatureException(SignatureAuthError):
    """An ``Authorization`` header (or date header) that does not parse."""

    aws_name = "IncompleteSignatureException"


class UnrecognizedClientException(SignatureAuthError):
    """An access key id the service does not know, or a session token."""

    aws_name = "UnrecognizedClientException"


class InvalidSignatureException(SignatureAuthError):
    """A wrong signature or scope, a time outside the skew window, a replay."""

    aws_name = "InvalidSignatureException"


_BAD_SIGNATURE = (
    "The request signature we calculated does not match the signature you provided."
    " Check your AWS Secret Access Key and signing method."
)
_UNKNOWN_CLIENT = "The security token included in the request is invalid."


# --- the request -------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedRequest:
    """One HTTP request as received.

    Args:
        method: the request method, e.g. ``POST``.
        path: the path as sent, still percent-encoded, without the query.
        query: the query string as sent (after ``?``), still encoded; ``""`` for none.
        headers: ``(name, value)`` pairs in the order received, repeats kept.
        body: the body's bytes.
    """

    method: str
    path: str
    query: str = ""
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""

    def header_values(self, name: str) -> list[str]:
        """Every value of the header ``name`` (any case), in the order received."""
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]


# --- replays -----------------------------------------------------------------------------


@dataclass
class ReplayCache:
    """Signatures accepted recently, so that each is accepted once.

    A signature is remembered until its request's time plus :data:`MAX_SKEW` (that instant
    included, as :func:`verify` accepts it), after which the request is refused as expired
    anyway. At most ``max_entries`` are kept. At the bound a signature is forgotten: the
    oldest of the ``owner`` (access key) that holds the most (the one adding, among
    equals). So a key that signs a flood of requests makes room by forgetting its own, and
    cannot push another key's out. A forgotten signature is never accepted again: from
    then on, a signature of that owner that the cache does not hold is refused unless it
    expires later than every one of theirs forgotten (its request's time is later). Such
    refusals fall on requests signed long before they arrive; with the bound well above
    what one key signs in a few minutes, there are none. Thread-safe.

    A client that sends an identical request twice within the same second (same time,
    same body) makes the same signature: SigV4's time has whole seconds, and clients such
    as boto3 sign nothing else that changes between calls by default. Less than
    ``repeat_grace`` seconds after a signature was first accepted, it is accepted again,
    so that such repeats are served; 0 (the default) refuses every repeat. A replay by
    someone who captured a request must then come within that grace of the original's
    arrival.
    """

    max_entries: int = 100_000
    repeat_grace: float = 0.0
    # signature -> (when it expires, when it was first accepted, its owner), oldest first
    _seen: OrderedDict[str, tuple[float, float, str]] = field(
        default_factory=OrderedDict, init=False, repr=False
    )
    # owner -> its signatures, oldest first
    _by_owner: dict[str, OrderedDict[str, None]] = field(
        default_factory=dict, init=False, repr=False
    )
    # owner -> the latest expiry among their forgotten signatures (until it is past)
    _forgotten_until: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {self.max_entries}")
        if not 0 <= self.repeat_grace <= MAX_SKEW.total_seconds():
            raise ValueError(f"repeat_grace must be 0 to 300 seconds, not {self.repeat_grace}")

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(
        self, signature: str, expires_at: float, now: float, *, owner: str = ""
    ) -> bool:
        """Remember ``signature`` of ``owner`` until ``expires_at`` (inclusive); False if it
        may not be accepted (see :meth:`admit`)."""
        return self.admit(signature, expires_at, now, owner=owner) is None

    def admit(
        self, signature: str, expires_at: float, now: float, *, owner: str = ""
    ) -> str | None:
        """Remember ``signature`` of ``owner`` until ``expires_at`` (inclusive), or say why
        not: ``"replayed"`` when it is remembered already and was first accepted more than
        ``repeat_grace`` seconds ago, ``"forgotten"`` when it may be one forgotten at the
        bound (it expires no later than one of its owner's that was)."""
        with self._lock:
            # Drop expired entries from the front; entries behind a live one wait their turn
            # (they are few: request times are all within the skew window of each other).
            while self._seen:
                oldest, (expiry, _first, _owner) = next(iter(self._seen.items()))
                if expiry >= now:
                    break
                self._forget(oldest)
            known = self._seen.get(signature)
            if known is not None and known[0] >= now:
                return None if now - known[1] < self.repeat_grace else "replayed"
            if known is not None:
                self._forget(signature)
            if expires_at <= self._forgotten_until.get(owner, -math.inf):
                return "forgotten"
            while len(self._seen) >= self.max_entries:
                self._make_room(owner, now)
            self._seen[signature] = (expires_at, now, owner)
            self._by_owner.setdefault(owner, OrderedDict())[signature] = None
            return None

    def _make_room(self, adding: str, now: float) -> None:
        """Forget the oldest signature of the owner holding the most, and no longer accept
        theirs that expire as early (floors already past are dropped: verify refuses what
        expired)."""
        victim = max(self._by_owner, key=lambda o: (len(self._by_owner[o]), o == adding))
        oldest = next(iter(self._by_owner[victim]))
        expiry = self._seen[oldest][0]
        self._forget(oldest)
        for past in [o for o, until in self._forgotten_until.items() if until < now]:
            del self._forgotten_until[past]
        self._forgotten_until[victim] = max(expiry, self._forgotten_until.get(victim, expiry))

    def _forget(self, signature: str) -> None:
        owner = self._seen.pop(signature)[2]
        signatures = self._by_owner[owner]
        del signatures[signature]
        if not signatures:
            del self._by_owner[owner]


# --- verification ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Authorization:
    access_key_id: str
    date: str
    region: str
    service: str
    terminator: str
    signed_headers: tuple[str, ...]
    signature: str


def verify(
    request: SignedRequest,
    secret_for: Callable[[str], bytes | None],
    *,
    region: str,
    service: str = "kms",
    now: _dt.datetime | None = None,
    replay_cache: ReplayCache | None = None,
) -> str:
    """Check ``request``'s SigV4 signature and return the access key id that signed it.

    Args:
        request: the request as received.
        secret_for: the secret access key of an access key id, or None when unknown.
        region: the region this service answers for (the credential scope's region).
        service: the service name in the credential scope.
        now: the current time (aware); the system clock when None.
        replay_cache: when given, a signature it has seen is refused.

    Raises:
        MissingAuthenticationTokenException: no ``Authorization`` header.
        IncompleteSignatureException: a malformed ``Authorization`` or date header.
        UnrecognizedClientException: an unknown access key id, or a session token.
        InvalidSignatureException: a wrong signature, scope or time, or a replay.
    """
    current = now if now is not None else _dt.datetime.now(_dt.UTC)
    if current.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    auth_values = request.header_values("authorization")
    if not auth_values:
        raise MissingAuthenticationTokenException("Missing Authentication Token")
    if len(auth_values) > 1:
        raise IncompleteSignatureException("more than one Authorization header")
    auth = _parse_authorization(auth_values[0])
    amz_date, when = _request_time(request)
    _check_scope(auth, amz_date, region=region, service=service)
    _check_time(amz_date, when, current)
    secret = secret_for(auth.access_key_id)
    if secret is None:
        raise UnrecognizedClientException(_UNKNOWN_CLIENT)
    if request.header_values("x-amz-security-token"):
        raise UnrecognizedClientException(
            f"{_UNKNOWN_CLIENT} envfs issues no temporary credentials: send no X-Amz-Security-Token"
        )
    payload_hash = _payload_hash(request)
    canonical = canonical_request(request, auth.signed_headers, payload_hash)
    scope = f"{auth.date}/{auth.region}/{auth.service}/{TERMINATOR}"
    expected = hmac.new(
        signing_key(secret, auth.date, auth.region, auth.service),
        string_to_sign(amz_date, scope, canonical).encode(),
        hashlib.sha256,
    ).hexdigest()
    if not hmac.compare_digest(expected.encode(), auth.signature.encode()):
        raise InvalidSignatureException(_BAD_SIGNATURE)
    if replay_cache is not None:
        _check_replay(auth.signature, auth.access_key_id, amz_date, when, replay_cache, current)
    return auth.access_key_id


def _check_replay(
    signature: str,
    owner: str,
    amz_date: str,
    when: _dt.datetime,
    replay_cache: ReplayCache,
    now: _dt.datetime,
) -> None:
    expires_at = (when + MAX_SKEW).timestamp()
    refused = replay_cache.admit(signature, expires_at, now.timestamp(), owner=owner)
    if refused == "replayed":
        raise InvalidSignatureException(
            "Signature already used: this request was replayed (signed at "
            f"{amz_date}); sign each request anew"
        )
    if refused is not None:
        raise InvalidSignatureException(
            f"Signature too old to be told from a replay (signed at {amz_date}, and this "
            "access key has signed many requests since); sign each request as it is sent"
        )


def _parse_authorization(value: str) -> _Authorization:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise IncompleteSignatureException(
            f"Unsupported AWS 'algorithm': {algorithm!r}; expected {ALGORITHM!r}"
        )
    parts: dict[str, str] = {}
    for item in rest.split(","):
        key, eq, val = item.strip().partition("=")
        # A malformed part is quoted only by its start: it may hold a signature (say,
        # "Signature:<hex>"), and these messages are logged.
        if not eq:
            raise IncompleteSignatureException(
                f"Authorization header part {_start(item.strip())!r} is not of the form key=value"
            )
        if key not in ("Credential", "SignedHeaders", "Signature"):
            raise IncompleteSignatureException(
                f"Authorization header has an unknown part {_start(key)!r}"
            )
        if key in parts:
            raise IncompleteSignatureException(f"Authorization header repeats {key!r}")
        parts[key] = val.strip()
    for key in ("Credential", "SignedHeaders", "Signature"):
        if key not in parts:
            raise IncompleteSignatureException(f"Authorization header requires {key!r} parameter")
    scope = parts["Credential"].split("/")
    if len(scope) != 5 or not all(scope):
        raise IncompleteSignatureException(
            "Authorization header's Credential must be"
            " ACCESS_KEY_ID/YYYYMMDD/REGION/SERVICE/aws4_request"
        )
    access_key_id, date, scope_region, scope_service, terminator = scope
    signed = parts["SignedHeaders"].split(";")
    if not all(_HEADER_NAME.match(name) for name in signed):
        raise IncompleteSignatureException(
            f"SignedHeaders {parts['SignedHeaders']!r} must be lowercase header names"
            " separated by ';'"
        )
    if signed != sorted(set(signed)):
        raise IncompleteSignatureException(
            f"SignedHeaders {parts['SignedHeaders']!r} must be sorted, without repeats"
        )
    if not _SIGNATURE_SHAPE.match(parts["Signature"]):
        raise IncompleteSignatureException("Signature must be 64 lowercase hex digits")
    return _Authorization(
        access_key_id=access_key_id,
        date=date,
        region=scope_region,
        service=scope_service,
        terminator=terminator,
        signed_headers=tuple(signed),
        signature=parts["Signature"],
    )


def _start(text: str, shown: int = 16) -> str:
    """``text`` cut to its first ``shown`` characters (and ``...``)."""
    return text if len(text) <= shown else text[:shown] + "..."


def _request_time(request: SignedRequest) -> tuple[str, _dt.datetime]:
    """The request's time as ``YYYYMMDDTHHMMSSZ`` and as an aware datetime."""
    amz = request.header_values("x-amz-date")
    if len(amz) > 1:
        raise IncompleteSignatureException("more than one X-Amz-Date header")
    if amz:
        text = amz[0].strip()
        if not _AMZ_DATE_SHAPE.match(text):
            raise IncompleteSignatureException(
                f"X-Amz-Date {text!r} is not of the form YYYYMMDDTHHMMSSZ"
            )
        try:
            when = _dt.datetime.strptime(text, _AMZ_DATE).replace(tzinfo=_dt.UTC)
        except ValueError:
            raise IncompleteSignatureException(f"X-Amz-Date {text!r} is not a date") from None
        return text, when
    dates = request.header_values("date")
    if len(dates) != 1:
        raise IncompleteSignatureException(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header"
        )
    try:
        parsed = email.utils.parsedate_to_datetime(dates[0].strip())
        # HTTP dates are GMT; a "-0000" zone (as Python's formatdate writes) parses naive.
        when = (
            parsed.replace(tzinfo=_dt.UTC) if parsed.tzinfo is None else parsed.astimezone(_dt.UTC)
        )
    except (TypeError, ValueError, OverflowError):  # a year or zone off the calendar's ends
        raise IncompleteSignatureException(f"Date {dates[0]!r} is not an HTTP date") from None
    return when.strftime(_AMZ_DATE), when


def _check_scope(auth: _Authorization, amz_date: str, *, region: str, service: str) -> None:
    if auth.terminator != TERMINATOR:
        raise InvalidSignatureException(
            f"Credential should be scoped with a valid terminator: {TERMINATOR!r},"
            f" not {auth.terminator!r}."
        )
    if auth.service != service:
        raise InvalidSignatureException(
            f"Credential should be scoped to correct service: {service!r}, not {auth.service!r}."
        )
    if auth.region != region:
        raise InvalidSignatureException(
            f"Credential should be scoped to a valid region: {region!r}, not {auth.region!r}."
        )
    if auth.date != amz_date[:8]:
        raise InvalidSignatureException(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date"
            f" from HTTP: {auth.date!r} != {amz_date[:8]!r}, from {amz_date!r}."
        )


def _check_time(amz_date: str, when: _dt.datetime, now: _dt.datetime) -> None:
    now_text = now.astimezone(_dt.UTC).strftime(_AMZ_DATE)
    minutes = int(MAX_SKEW.total_seconds()) // 60
    if when < now - MAX_SKEW:
        earliest = (now - MAX_SKEW).astimezone(_dt.UTC).strftime(_AMZ_DATE)
        raise InvalidSignatureException(
            f"Signature expired: {amz_date} is now earlier than {earliest}"
            f" ({now_text} - {minutes} min.)"
        )
    if when > now + MAX_SKEW:
        latest = (now + MAX_SKEW).astimezone(_dt.UTC).strftime(_AMZ_DATE)
        raise InvalidSignatureException(
            f"Signature not yet current: {amz_date} is still later than {latest}"
            f" ({now_text} + {minutes} min.)"
        )


def _payload_hash(request: SignedRequest) -> str:
    actual = hashlib.sha256(request.body).hexdigest()
    claimed = request.header_values("x-amz-content-sha256")
    if len(claimed) > 1:
        raise IncompleteSignatureException("more than one X-Amz-Content-Sha256 header")
    if claimed and claimed[0].strip() != actual:
        raise InvalidSignatureException(
            "X-Amz-Content-Sha256 does not match the SHA-256 of the request body"
        )
    return actual


# --- the pieces of a signature (also used by tests) ---------------------------------------


def _aws_quote(text: str, safe: str = "") -> str:
    """Percent-encode all but AWS's unreserved characters (A-Z a-z 0-9 - _ . ~)."""
    return quote(text, safe=safe)


def canonical_uri(path: str) -> str:
    """The canonical URI of a raw (still encoded) path, as botocore makes it for non-S3."""
    if not path:
        return "/"
    kept: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if kept:
                kept.pop()
            continue
        kept.append(segment)
    first = "/" if path.startswith("/") else ""
    last = "/" if path.endswith("/") and kept else ""
    return _aws_quote(first + "/".join(kept) + last, safe="/~")


def canonical_query(query: str) -> str:
    """The canonical query string: pairs decoded, re-encoded and sorted."""
    pairs: list[tuple[str, str]] = []
    for item in query.split("&"):
        if not item:
            continue
        key, _, value = item.partition("=")
        pairs.append((_aws_quote(unquote(key)), _aws_quote(unquote(value))))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def canonical_request(
    request: SignedRequest, signed_headers: Sequence[str], payload_hash: str
) -> str:
    """The canonical request over ``signed_headers`` (lowercase, sorted).

    The headers are grouped by name in one pass: looking each signed name up among all
    headers would cost their product, a second of the worker per request for a head of
    a thousand headers all signed, from anyone who knows an access key id (not a secret).
    """
    present: dict[str, list[str]] = {}
    for name, value in request.headers:
        present.setdefault(name.lower(), []).append(value)
    if "host" not in signed_headers:
        raise InvalidSignatureException("'Host' must be a signed header (SignedHeaders)")
    missing = [name for name in signed_headers if name not in present]
    if missing:
        raise InvalidSignatureException(
            f"SignedHeaders names headers the request does not have: {', '.join(missing)}"
        )
    signed = set(signed_headers)
    unsigned = sorted(n for n in present if n.startswith("x-amz-") and n not in signed)
    if unsigned:
        raise InvalidSignatureException(
            f"x-amz-* headers must be signed; not in SignedHeaders: {', '.join(unsigned)}"
        )
    lines = []
    for name in signed_headers:
        values = [" ".join(v.split()) for v in present[name]]
        lines.append(f"{name}:{','.join(values)}\n")
    return "\n".join(
        [
            request.method.upper(),
            canonical_uri(request.path),
            canonical_query(request.query),
            "".join(lines),
            ";".join(signed_headers),
            payload_hash,
        ]
    )


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def signing_key(secret: bytes, date: str, region: str, service: str) -> bytes:
    """The key derived from a secret access key for one day, region and service."""
    key = hmac.new(b"AWS4" + secret, date.encode(), hashlib.sha256).digest()
    for part in (region, service, TERMINATOR):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key
