"""``envfs kms <verb> --endpoint-url URL``: the verbs against a key service's HTTP endpoint.

The connection options of that path, and opening it: the URL checked (``https://``, or
``http://`` to a loopback address only), the credentials found where aws-cli finds them
(botocore's chain: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` or
``--profile``, ``~/.aws/credentials`` and ``~/.aws/config`` or ``AWS_SHARED_CREDENTIALS_FILE``
and ``AWS_CONFIG_FILE``, ``credential_process``, ..., but not the EC2 and ECS metadata
services; never with a session token), the CA bundle from ``--ca-bundle``,
``AWS_CA_BUNDLE`` or the profile's ``ca_bundle``, the attempts from ``AWS_MAX_ATTEMPTS`` or
the profile's ``max_attempts``. ``AWS_PROFILE`` with ``AWS_ACCESS_KEY_ID`` is refused, as
botocore would take the variable's key. ``--region`` is the region requests are signed for; a
profile's ``region`` is not used (it usually names an AWS region, not the store's).

``ENVFS_KMS_ENDPOINT_URL`` gives a default URL, as ``ENVFS_KMS_SOCKET`` gives a socket.
aws-cli's ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_KMS`` are not read: they are set for
other tools (a LocalStack, a VPC endpoint of AWS KMS), and an ``envfs kms`` verb that
silently left the local key service for one of those would surprise.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from envfs import __version__
from envfs.errors import UsageError
from envfs.kms.httpclient import (
    DEFAULT_ATTEMPTS,
    Credentials,
    Endpoint,
    HTTPKMSClient,
    header_safe,
    tls_context,
)

ENV_URL = "ENVFS_KMS_ENDPOINT_URL"


MAX_TIMEOUT = 86400.0  # seconds; Python's clocks overflow near 9.2e9 (0 is no limit)


def _timeout(text: str) -> float | None:
    """argparse type of ``--cli-*-timeout``: seconds up to :data:`MAX_TIMEOUT`, 0 for none
    (as aws-cli, which takes any number)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds from 0 (no limit) to {MAX_TIMEOUT:g}"
        )
    return value or None


def add_options(group: argparse._ArgumentGroup) -> None:
    """The HTTP endpoint's options, in the verbs' connection options group."""
    group.add_argument(
        "--endpoint-url",
        metavar="URL",
        default=os.environ.get(ENV_URL) or None,
        help="call the key service's HTTP endpoint (envfs kms serve --listen-http) instead"
        " of the daemon's socket or the store: https://HOST[:PORT], or http:// to a loopback"
        f" address only; as the user of the AWS access key used (env {ENV_URL})",
    )
    group.add_argument(
        "--profile",
        metavar="NAME",
        help="with --endpoint-url: the aws-cli profile whose credentials sign requests"
        " (default: AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (not both),"
        " else the default profile)",
    )
    group.add_argument(
        "--ca-bundle",
        metavar="FILE",
        help="with --endpoint-url: trust the CA certificates in FILE (PEM) for https"
        " (default: AWS_CA_BUNDLE, the profile's ca_bundle, else the system's CAs)",
    )
    group.add_argument(
        "--cli-connect-timeout",
        metavar="SECONDS",
        type=_timeout,
        default=10.0,
        help="with --endpoint-url: wait at most this long to connect (0: no limit; default 10)",
    )
    group.add_argument(
        "--cli-read-timeout",
        metavar="SECONDS",
        type=_timeout,
        default=60.0,
        help="with --endpoint-url: wait at most this long for an answer (0: no limit; default 60)",
    )


def wanted(args: argparse.Namespace) -> bool:
    """Whether the verb is to call an HTTP endpoint; refuses options of the other paths.

    Raises:
        UsageError: ``--embedded``, or ``--socket``, ``--kms-dir`` or ``--passphrase-file``
            given on the command line, with an endpoint; or endpoint-only options without one.
    """
    url = getattr(args, "endpoint_url", None)
    if url is None:
        for flag in ("profile", "ca_bundle"):
            if getattr(args, flag, None) is not None:
                option = "--" + flag.replace("_", "-")
                raise UsageError(f"argument {option}: only with --endpoint-url URL")
        return False
    source = "--endpoint-url" if os.environ.get(ENV_URL) != url else ENV_URL
    if getattr(args, "embedded", False):
        raise UsageError(
            f"argument --embedded: not allowed with {source} (the store or the endpoint, not both)"
        )
    for flag, variable in _LOCAL_OPTIONS:
        if _on_command_line(getattr(args, flag, None), variable):
            option = "--" + flag.replace("_", "-")
            raise UsageError(
                f"argument {option}: not allowed with {source} (the local key service or the"
                " endpoint, not both)"
            )
    return True


# The local service's options, each with the variable that gives its default: from the
# variable they are ignored with an endpoint (set for other commands); given on the command
# line they are refused, as a verb the user meant for the local service must not act on a
# remote one (a schedule-key-deletion, say) because ENVFS_KMS_ENDPOINT_URL is exported.
_LOCAL_OPTIONS = (
    ("socket", "ENVFS_KMS_SOCKET"),
    ("kms_dir", "ENVFS_KMS_DIR"),
    ("passphrase_file", "ENVFS_KMS_PASSPHRASE_FILE"),
)


def _on_command_line(value: object, variable: str) -> bool:
    """Whether an option's ``value`` was given as a flag rather than by ``variable``."""
    if value is None:
        return False
    from_environment = os.environ.get(variable) or None
    return from_environment is None or Path(from_environment) != Path(str(value))


class EndpointConnection:
    """Calls to an HTTP endpoint as the access key's user, for the command line (what a
    :class:`~envfs.keys.choice.KeyServiceConnection` gives it, without a key provider:
    none is made yet over HTTP)."""

    def __init__(self, client: HTTPKMSClient) -> None:
        self.client = client

    def call(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        return self.client.call(operation, params)

    def close(self) -> None:
        pass  # one connection per call, closed after it

    def __enter__(self) -> EndpointConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_endpoint(args: argparse.Namespace) -> EndpointConnection:
    """A connection whose calls go to ``--endpoint-url``, signed with the credentials
    aws-cli would use. Nothing is sent until the first call.

    Raises:
        UsageError: a malformed or refused URL, no credentials, an unknown profile.
    """
    url: str = args.endpoint_url
    try:
        endpoint = Endpoint.parse(url)
    except ValueError as exc:
        raise UsageError(f"argument --endpoint-url: {exc}") from None
    session = _session(args.profile)
    ca_bundle = args.ca_bundle or _config(session, "ca_bundle", args.profile)
    if ca_bundle:
        _check_ca_bundle(str(ca_bundle), "argument --ca-bundle" if args.ca_bundle else None)
    attempts = _config(session, "max_attempts", args.profile)
    credentials = _credentials(session, args.profile)
    client = HTTPKMSClient(
        endpoint,
        credentials,
        args.region,
        ca_bundle=str(ca_bundle) if ca_bundle else None,
        connect_timeout=args.cli_connect_timeout,
        read_timeout=args.cli_read_timeout,
        max_attempts=_attempts(attempts),
        user_agent=f"envfs/{__version__}",
    )
    return EndpointConnection(client)


def _session(profile: str | None) -> Any:
    import botocore.exceptions
    import botocore.session

    try:
        session = botocore.session.Session(profile=profile)
        resolver = session.get_component("credential_provider")
    except botocore.exceptions.ProfileNotFound as exc:
        raise UsageError(f"{_profile_source(profile)}: {exc}") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise UsageError(f"cannot read the AWS configuration: {_safe(exc)}") from None
    # The metadata services hand out AWS's own temporary credentials, never an envfs access
    # key, over plain HTTP to a link-local address that anyone on the link can answer: a
    # machine without credentials would sign with a stranger's key, and act as its user.
    for method in _METADATA_PROVIDERS:
        resolver.remove(method)
    return session


_METADATA_PROVIDERS = ("iam-role", "container-role")  # EC2's IMDS, ECS's endpoint


def _profile_source(profile: str | None) -> str:
    """Where the profile came from, for a message: the flag or ``AWS_PROFILE``."""
    return "argument --profile" if profile is not None else "AWS_PROFILE"


def _config(session: Any, name: str, profile: str | None) -> Any:
    import botocore.exceptions

    try:
        return session.get_config_variable(name)
    except ValueError:  # a number that is not one (AWS_MAX_ATTEMPTS=abc)
        raise UsageError(
            f"{name} (AWS_{name.upper()} or the profile's) is not a valid value"
        ) from None
    except botocore.exceptions.ProfileNotFound as exc:
        raise UsageError(f"{_profile_source(profile)}: {exc}") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise UsageError(f"cannot read the AWS configuration: {_safe(exc)}") from None


def _check_ca_bundle(path: str, flag: str | None) -> None:
    """Refuse a CA bundle that cannot be used, as a usage error naming where it was given."""
    try:
        tls_context(path)
    except (OSError, ssl.SSLError) as exc:
        where = flag or "the CA bundle (AWS_CA_BUNDLE or the profile's ca_bundle)"
        if isinstance(exc, ssl.SSLError) or not exc.strerror:  # SSLError is an OSError
            reason = "not PEM"
        else:
            reason = exc.strerror.lower()
        raise UsageError(
            f"{where}: {path!r} cannot be used: {reason} (a PEM file of CA certificates)"
        ) from None


def _attempts(value: Any) -> int:
    if value is None:
        return DEFAULT_ATTEMPTS
    try:
        attempts = int(value)
    except (TypeError, ValueError):
        attempts = 0
    if attempts < 1:
        raise UsageError(
            f"max_attempts (AWS_MAX_ATTEMPTS or the profile) must be 1 or more, not {value!r}"
        )
    return attempts


def _credentials(session: Any, profile: str | None) -> Credentials:
    import botocore.exceptions

    named = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
    if profile is None and named and os.environ.get("AWS_ACCESS_KEY_ID"):
        # botocore (and aws-cli) sign with the variables' key then, not the profile's: a
        # user who set AWS_PROFILE=alice would act as whoever owns the exported key.
        raise UsageError(
            f"AWS_PROFILE names profile {named!r} and AWS_ACCESS_KEY_ID is set too, so it"
            " is not clear whose key is to sign (aws-cli would take the variable's): unset"
            " one of them, or give --profile NAME"
        )

    try:
        found = session.get_credentials()
        frozen = found.get_frozen_credentials() if found is not None else None
    except botocore.exceptions.ProfileNotFound as exc:
        raise UsageError(f"{_profile_source(profile)}: {exc}") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise UsageError(f"cannot get AWS credentials: {_safe(exc)}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # botocore's own parsing of a credential_process's output (not JSON, an Expiration
        # that is no date) raises these: the output may hold a secret, so it is not quoted.
        raise UsageError(f"cannot get AWS credentials: {_safe(exc)}") from None
    if frozen is None or not frozen.access_key or not frozen.secret_key:
        where = f"profile {profile!r}" if profile else "the environment or the default profile"
        raise UsageError(
            f"--endpoint-url needs AWS credentials and {where} has none: set"
            " AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile with"
            " aws_access_key_id and aws_secret_access_key (--profile NAME), from"
            " 'envfs kms create-access-key'"
        )
    if frozen.token:
        # envfs issues no temporary credentials: these are AWS's (STS, SSO, a role), and an
        # endpoint, which would refuse them, need not see their key id and token.
        raise UsageError(
            "the AWS credentials found carry a session token (AWS_SESSION_TOKEN, or a"
            " profile's): they are AWS's temporary credentials, not an envfs access key;"
            " give the key 'envfs kms create-access-key' printed (--profile NAME)"
        )
    texts = (frozen.access_key, frozen.secret_key, frozen.token or "-")
    if not all(isinstance(text, str) for text in texts):  # a credential_process's numbers
        raise UsageError(
            "cannot get AWS credentials: the access key id, secret or session token is not a string"
        )
    if not header_safe(frozen.access_key) or not header_safe(frozen.token or "-"):
        where = f"profile {profile!r}" if profile else "the environment or the default profile"
        raise UsageError(
            f"the AWS access key id or session token of {where} has spaces, control or"
            " non-ASCII characters (a carriage return from a file written on Windows?)"
        )
    return Credentials(frozen.access_key, frozen.secret_key, frozen.token or None)


def _safe(exc: BaseException) -> str:
    """A botocore error named without its text for the kinds that may quote a credential
    process's output; the others' messages name files and profiles only."""
    import botocore.exceptions

    if isinstance(
        exc,
        (
            botocore.exceptions.ProfileNotFound,
            botocore.exceptions.ConfigNotFound,
            botocore.exceptions.ConfigParseError,
            botocore.exceptions.PartialCredentialsError,
            botocore.exceptions.NoCredentialsError,
        ),
    ):
        return str(exc)
    return f"{type(exc).__name__} (details withheld: they may hold credentials)"
