"""``envfs kms ...``: one verb per key-service operation, plus ``init``, ``serve`` and ``audit``.

The operation verbs are generated from :data:`envfs.kms.operations.OPERATIONS`: the verb is
``Operation.verb``, each parameter a ``Param.flag``. A verb talks to the key-service daemon
when its socket exists (``--socket``, ``$ENVFS_KMS_SOCKET`` or ``/run/envfs/kms-REGION.sock``)
and ``--embedded`` is not given; otherwise it opens the region's store itself, acting as the
current Unix user.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import grp
import logging
import os
import pwd
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from envfs import notify
from envfs.cli import endpoint
from envfs.cli.common import add_output_options, configure_logging, print_answer, region_type
from envfs.cli.params import ArgumentError, build_request, read_file_bytes
from envfs.errors import AuditVerificationError, UsageError
from envfs.keys.choice import KeyServiceChoice, KeyServiceConnection, connect
from envfs.kms.limits import Limits, Rate
from envfs.kms.model import DEFAULT_KEY_CREATORS_GROUP, DEFAULT_REGION
from envfs.kms.operations import OPERATIONS, Operation, Param, ParamType
from envfs.kms.paths import SOCKET_DIR, SYSTEM_KMS_DIR

if TYPE_CHECKING:
    from envfs.kms.store import KeyStore

logger = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]

# Served by ``envfs kms audit`` rather than verbs of their own.
_AUDIT_OPERATIONS = ("ListAuditRecords", "VerifyAudit")

_EXAMPLES: dict[str, str] = {
    "create-key": """examples:
  envfs kms create-key --description "payroll" --tags TagKey=team,TagValue=hr
  envfs kms create-key --key-administrators user:alice,group:kms-admins --key-users user:bob""",
    "encrypt": """examples:
  envfs kms encrypt --key-id alias/demo --plaintext fileb://secret.txt \\
      --output text --query CiphertextBlob | base64 -d > secret.txt.enc
  envfs kms encrypt --key-id alias/demo --plaintext "$(printf hi | base64)" \\
      --encryption-context purpose=test,team=hr""",
    "decrypt": """examples:
  envfs kms decrypt --ciphertext-blob fileb://secret.txt.enc \\
      --output text --query Plaintext | base64 -d""",
    "re-encrypt": """examples:
  envfs kms re-encrypt --ciphertext-blob fileb://secret.txt.enc \\
      --destination-key-id alias/other --output text --query CiphertextBlob | base64 -d""",
    "generate-data-key": """examples:
  envfs kms generate-data-key --key-id alias/demo --key-spec AES_256""",
    "create-access-key": """examples:
  envfs kms create-access-key --user alice
  envfs kms create-access-key --user 1001 --output text \
      --query 'AccessKey.[AccessKeyId,SecretAccessKey]'

The secret access key is shown this once and cannot be read again: keep it (e.g. in
~/.aws/credentials as aws_secret_access_key). Root and members of the key creators group
may create keys for any user; any other user only for themselves (at most 2 per user).""",
    "list-access-keys": """examples:
  envfs kms list-access-keys
  envfs kms list-access-keys --user alice --output table""",
    "update-access-key": """examples:
  envfs kms update-access-key --access-key-id EKIAJ5QW2LBVXZ3HK4MA --status Inactive""",
    "delete-access-key": """examples:
  envfs kms delete-access-key --access-key-id EKIAJ5QW2LBVXZ3HK4MA""",
    "put-key-policy": """examples:
  envfs kms put-key-policy --key-id alias/demo --policy file://policy.json""",
    "audit": """examples:
  envfs kms audit --key-id alias/demo --since 2025-01-01T00:00:00Z
  envfs kms audit --verify
  envfs kms audit --archive audit-2024.jsonl --before 2025-01-01T00:00:00Z
  envfs kms audit --archive audit-old.jsonl --keep 100000
  envfs kms audit --verify-archive audit-2023.jsonl audit-2024.jsonl
  envfs kms audit --repair --archive audit-quarantine.jsonl""",
}

_TYPE_NOTES: dict[ParamType, str] = {
    ParamType.BLOB: "fileb://PATH: a file's raw bytes; else standard base64 text (padded;"
    " line breaks allowed), or file://PATH holding it",
    ParamType.CONTEXT: "k=v,k2=v2 or a JSON object",
    ParamType.TAGS: "one TagKey=k,TagValue=v per word, or a JSON list",
    ParamType.STRING_LIST: "separated by spaces or commas",
}
_LIST_METAVARS: dict[ParamType, str] = {
    ParamType.CONTEXT: "K=V",
    ParamType.TAGS: "TAG",
    ParamType.STRING_LIST: "ITEM",
}


# --- common options ----------------------------------------------------------------------


def _env_path(name: str) -> str | None:
    return os.environ.get(name) or None


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("key store options")
    group.add_argument(
        "--region",
        type=region_type,
        default=os.environ.get("ENVFS_REGION") or DEFAULT_REGION,
        help=f"the region whose keys to use (env ENVFS_REGION; default {DEFAULT_REGION!r})",
    )
    group.add_argument(
        "--kms-dir",
        metavar="DIR",
        type=Path,
        default=_env_path("ENVFS_KMS_DIR"),
        help=f"where region stores live (env ENVFS_KMS_DIR; default {SYSTEM_KMS_DIR} for"
        " root, else ~/.local/state/envfs/kms)",
    )
    group.add_argument(
        "--passphrase-file",
        metavar="FILE",
        default=_env_path("ENVFS_KMS_PASSPHRASE_FILE"),
        help="read the store's passphrase from FILE (env ENVFS_KMS_PASSPHRASE_FILE); asked"
        " on the terminal when needed and not given",
    )


def _add_socket_option(parser: argparse._ActionsContainer, help_text: str) -> None:
    parser.add_argument(
        "--socket",
        metavar="PATH",
        type=Path,
        default=_env_path("ENVFS_KMS_SOCKET"),
        help=help_text + f" (env ENVFS_KMS_SOCKET; default {SOCKET_DIR}/kms-REGION.sock)",
    )


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    """Every verb that calls the service: store, connection and output options."""
    _add_store_options(parser)
    group = parser.add_argument_group("connection options")
    _add_socket_option(group, "the key daemon's socket, used when it exists")
    group.add_argument(
        "--embedded",
        action="store_true",
        help="never use the daemon: open the region's store in this process",
    )
    endpoint.add_options(group)
    add_output_options(parser)


# --- the backend: daemon or embedded store -------------------------------------------------


def _store_directory(args: argparse.Namespace) -> Path:
    from envfs.kms.paths import default_kms_dir, region_store_dir

    return region_store_dir(args.kms_dir or default_kms_dir(), args.region)


def _read_passphrase_file(path: str) -> bytes:
    data = read_file_bytes("--passphrase-file", path)
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise ArgumentError("--passphrase-file", f"{path!r} holds an empty passphrase")
    return data


def open_store(args: argparse.Namespace) -> KeyStore:
    """Open the region's store, asking for its passphrase on the terminal if needed."""
    from envfs.kms.store import DB_NAME, KeyStore

    directory = _store_directory(args)
    passphrase: bytes | None = None
    if args.passphrase_file:
        passphrase = _read_passphrase_file(args.passphrase_file)
    elif (
        sys.stdin is not None
        and sys.stdin.isatty()
        and (directory / DB_NAME).exists()
        and KeyStore.needs_passphrase(directory)
    ):
        prompt = f"passphrase of the key store of region {args.region!r}: "
        passphrase = getpass.getpass(prompt).encode()
    return KeyStore.open(directory, args.region, passphrase=passphrase)


@contextlib.contextmanager
def open_backend(
    args: argparse.Namespace, *, due_tasks: bool = True
) -> Iterator[KeyServiceConnection | endpoint.EndpointConnection]:
    """The HTTP endpoint if ``--endpoint-url`` was given; else the daemon if its socket
    exists and ``--embedded`` was not given, else the store (carrying out due rotations
    and deletions first, unless ``due_tasks`` is False)."""
    from envfs.kms.paths import default_socket_path

    if endpoint.wanted(args):
        with endpoint.open_endpoint(args) as remote:
            yield remote
        return

    socket_path: Path = args.socket or default_socket_path(args.region)
    daemon = not args.embedded and socket_path.exists()
    choice = KeyServiceChoice(socket_path if daemon else None)
    with connect(
        choice, args.region, open_store=lambda: open_store(args), due_tasks=due_tasks
    ) as kms:
        yield kms


# --- operation verbs -----------------------------------------------------------------------


def _metavar(param: Param) -> str:
    return param.flag[2:].upper().replace("-", "_")


def _add_param(group: argparse._ArgumentGroup, param: Param) -> None:
    help_text = param.help or param.name
    note = _TYPE_NOTES.get(param.type)
    if note and "JSON" not in help_text:  # the table's help may already say how to write it
        help_text = f"{help_text} ({note})"
    if param.required:
        help_text += " [required]"
    if param.type is ParamType.BOOLEAN:
        group.add_argument(
            param.flag,
            dest=param.name,
            action=argparse.BooleanOptionalAction,
            default=None,
            help=help_text,
        )
    elif param.type in (ParamType.CONTEXT, ParamType.TAGS, ParamType.STRING_LIST):
        group.add_argument(
            param.flag,
            dest=param.name,
            metavar=_LIST_METAVARS[param.type],
            nargs="+",
            action="extend",
            required=param.required,
            help=help_text,
        )
    else:
        group.add_argument(
            param.flag,
            *param.aliases,
            dest=param.name,
            metavar=_metavar(param),
            required=param.required,
            help=help_text,
        )


def _check_user(request: Mapping[str, Any]) -> None:
    """Refuse an unknown ``--user`` before calling (the service would refuse it too)."""
    name = request.get("UserName")
    if name is None:
        return
    try:
        if name.isdecimal():
            pwd.getpwuid(int(name))
        else:
            pwd.getpwnam(name)
    except (KeyError, OverflowError, ValueError):
        raise ArgumentError(
            "--user", f"no such user {name!r}", "give a user name or a numeric uid"
        ) from None


def _run_operation(operation: Operation, args: argparse.Namespace) -> int:
    request = build_request(operation, vars(args))
    if not endpoint.wanted(args):  # an endpoint's users are its machine's, not ours
        _check_user(request)
    with open_backend(args) as backend:
        response = backend.call(operation.name, request)
    print_answer(args, response, operation.name)
    return 0


# --- init ----------------------------------------------------------------------------------


def _ask_new_passphrase() -> bytes:
    first = getpass.getpass("new passphrase for the key store: ")
    if not first:
        raise UsageError("the passphrase must not be empty")
    if getpass.getpass("repeat the passphrase: ") != first:
        raise UsageError("the two passphrases differ")
    return first.encode()


def _init(args: argparse.Namespace) -> int:
    from envfs.kms.rootkey import ROOT_KEY_NAME
    from envfs.kms.store import KeyStore

    directory = _store_directory(args)
    passphrase: bytes | None = None
    if args.passphrase_file:
        passphrase = _read_passphrase_file(args.passphrase_file)
    elif args.passphrase:
        passphrase = _ask_new_passphrase()
    store = KeyStore.init(
        directory, args.region, passphrase=passphrase, key_creators_group=args.key_creators_group
    )
    store.close()
    out = sys.stdout
    out.write(f"created the key store of region {args.region!r} in {directory}\n")
    if passphrase is None:
        out.write(
            f"root key: {directory / ROOT_KEY_NAME} (mode 0600)\n"
            "keep it secret and back it up: without it the keys in this store cannot be used\n"
        )
    else:
        out.write(
            "root key: derived from the passphrase (scrypt)\n"
            "keep the passphrase secret and safe: without it the keys in this store cannot be"
            " used\n"
        )
    out.write(f"key creators: root and members of group {args.key_creators_group!r}\n")
    try:
        grp.getgrnam(args.key_creators_group)
    except KeyError:
        sys.stderr.write(
            f"envfs: hint: group {args.key_creators_group!r} does not exist yet; until it"
            f" does only root can create keys (groupadd {args.key_creators_group})\n"
        )
    return 0


# --- serve ---------------------------------------------------------------------------------


def _trusted_service(text: str) -> tuple[int, str] | None:
    """argparse type of ``--trust-on-behalf-of``: ``UID=NAME``, or ``none``."""
    if text == "none":
        return None
    uid, _, name = text.partition("=")
    if not uid.isdigit() or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not UID=NAME (e.g. 0=envfs-mount; NAME of letters, digits, - and _)"
        )
    return int(uid), name


def _trusted_services(given: list[tuple[int, str] | None] | None) -> dict[int, str]:
    if given is None:
        return {0: "envfs-mount"}
    return {entry[0]: entry[1] for entry in given if entry is not None}


def _rate(text: str) -> Rate | None:
    """argparse type of the ``--uid-*-rate`` options: ``RATE[:BURST]`` or ``off``."""
    try:
        return Rate.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    """argparse type of a number of connections: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _seconds(text: str) -> float:
    """argparse type of a timeout: seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(
        max_connections_per_uid=args.max_connections_per_uid,
        connection_rate=args.uid_connection_rate,
        call_rate=args.uid_call_rate,
        failure_rate=args.uid_failure_rate,
    )


async def _serve_until_signalled(serve: Callable[..., Any], ready_status: str) -> None:
    """Run ``serve`` until SIGINT or SIGTERM, telling systemd when it accepts calls."""
    import trio

    async def run_server(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(task_status=task_status)
        nursery.cancel_scope.cancel()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_server)  # returns once the listener accepts calls
            notify.ready(ready_status)
            async for signum in signals:
                logger.info("received %s, stopping", signal.Signals(signum).name)
                notify.stopping()
                nursery.cancel_scope.cancel()
                break


def _listener(args: argparse.Namespace) -> tuple[socket.socket, Path | None]:
    """The listening socket: systemd's (socket activation) or one bound at ``--socket``.

    Returns the socket and the path to remove at exit (None for systemd's: it owns it).
    """
    from envfs.kms import server
    from envfs.kms.paths import default_socket_path

    try:
        inherited = notify.listen_fds()
    except ValueError as exc:
        raise UsageError(f"socket activation: {exc}") from None
    if not inherited:
        socket_path: Path = args.socket or default_socket_path(args.region)
        return server.bind_unix_socket(socket_path), socket_path
    if len(inherited) != 1:
        raise UsageError(f"socket activation: expected one socket, systemd passed {len(inherited)}")
    sock = inherited[0]
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        raise UsageError(
            "socket activation: the passed socket is not a listening Unix stream socket"
            " (ListenStream=/PATH in the .socket unit)"
        )
    return sock, None


def _address(text: str) -> tuple[str, int]:
    """argparse type of ``--listen-http``: ``HOST:PORT``."""
    from envfs.kms.httpserver import parse_address

    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _http_endpoint(args: argparse.Namespace, service: Any) -> Any:
    """The HTTP endpoint ``--listen-http`` asks for (an ``HttpEndpoint``), or None.

    Raises:
        UsageError: TLS half given, plain HTTP on an address that is not a loopback one,
            or an address or certificate that cannot be used.
    """
    from envfs.kms import httpserver

    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.listen_http is None:
        if args.tls_cert is not None:
            raise UsageError("--tls-cert and --tls-key need --listen-http")
        return None
    tls = None
    if args.tls_cert is not None:
        tls = httpserver.tls_context(args.tls_cert, args.tls_key)
    sock = httpserver.bind_tcp(*args.listen_http)
    if tls is None and not httpserver.is_loopback(sock):
        sock.close()
        raise UsageError(
            f"--listen-http {args.listen_http[0]}:{args.listen_http[1]} is not a loopback"
            " address: give --tls-cert and --tls-key (plain HTTP only on 127.0.0.1 or ::1)"
        )
    return httpserver.HttpEndpoint(
        sock,
        args.region,
        secret_for=service.signing_secret,
        key_used=service.access_key_used,
        tls=tls,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        max_connections_per_address=args.http_connections_per_address,
        failure_rate=args.http_failure_rate,
    )


def _serve(args: argparse.Namespace) -> int:
    import trio

    from envfs.kms import server
    from envfs.kms.service import KeyService

    configure_logging()
    store = open_store(args)
    try:
        service = KeyService(store)
        try:
            listener, socket_path = _listener(args)
            address = listener.getsockname()
            logger.info(
                "serving region %r from %s on %s%s",
                args.region,
                store.directory,
                address,
                "" if socket_path else " (socket from systemd)",
            )
            limits = _limits(args)
            logger.info(
                "limits per uid: %d connections at once, new connections %s, calls %s,"
                " failed calls %s (RATE:BURST)",
                limits.max_connections_per_uid,
                limits.connection_rate or "off",
                limits.call_rate or "off",
                limits.failure_rate or "off",
            )
            http = None
            try:
                http = _http_endpoint(args, service)
                if http is not None:
                    address = f"{address} and {http.url}"
                serve = partial(
                    server.serve,
                    service.handle,
                    listener,
                    idle_timeout=args.idle_timeout,
                    max_connections=args.max_connections,
                    limits=limits,
                    periodic=service.run_due_tasks,
                    trusted_services=_trusted_services(args.trust_on_behalf_of),
                    on_refused=service.record_refusal,
                    on_throttled=service.record_throttled,
                    http=http,
                )
                status = f"serving region {args.region} on {address}"
                trio.run(_serve_until_signalled, serve, status)
            finally:
                listener.close()
                if http is not None:
                    http.sock.close()
                if socket_path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        socket_path.unlink()
        finally:
            service.close()
    finally:
        store.close()
    return 0


# --- audit ---------------------------------------------------------------------------------


def _not_with(flag: str, given: dict[str, bool], *others: str) -> None:
    clash = [other for other in others if given[other]]
    if clash:
        raise UsageError(f"argument {flag}: not allowed with {' or '.join(clash)}")


def _audit_mode(args: argparse.Namespace) -> str:
    """Which of the audit command's jobs its flags ask for; refuses mixtures."""
    given = {
        "--key-id": args.key_id is not None,
        "--since": args.since is not None,
        "--verify": args.verify,
        "--archive": args.archive is not None,
        "--before": args.before is not None,
        "--keep": args.keep is not None,
        "--repair": args.repair,
        "--verify-archive": args.verify_archive is not None,
    }
    listing = ("--key-id", "--since")
    if given["--verify"]:
        _not_with("--verify", given, *listing, "--archive", "--before", "--keep", "--repair")
        _not_with("--verify", given, "--verify-archive")
        return "verify"
    if given["--verify-archive"]:
        _not_with("--verify-archive", given, *listing, "--archive", "--before", "--keep")
        _not_with("--verify-archive", given, "--repair")
        return "verify-archive"
    if given["--repair"]:
        _not_with("--repair", given, *listing, "--before", "--keep")
        if not given["--archive"]:
            raise UsageError("argument --repair: needs --archive FILE (where moved rows go)")
        return "repair"
    if given["--archive"]:
        _not_with("--archive", given, *listing)
        if given["--before"] == given["--keep"]:
            raise UsageError("argument --archive: needs one of --before TIME and --keep N")
        return "archive"
    for flag in ("--before", "--keep"):
        if given[flag]:
            raise UsageError(f"argument {flag}: needs --archive FILE")
    return "list"


def _owner_call(args: argparse.Namespace, run: Callable[[Any, Any], dict[str, Any]]) -> Any:
    """Archive, repair, verify archives: always on the store itself (never the daemon),
    as the current user, without due tasks (they could not be audited on a damaged log)."""
    if endpoint.wanted(args):
        raise UsageError(
            "--archive, --repair and --verify-archive work on the store itself, as its owner:"
            " not with --endpoint-url"
        )
    from envfs.identity import Caller
    from envfs.kms.service import KeyService

    service = KeyService(open_store(args))
    try:
        return run(service, Caller.current())
    finally:
        service.close()


def _verified_line(result: Mapping[str, Any]) -> str:
    count = result.get("Records", 0)
    checkpoint = result.get("Checkpoint") or 0
    if not checkpoint:
        return f"audit log verified: {count} records"
    return (
        f"audit log verified: {count} records ({checkpoint + 1} to {checkpoint + count};"
        f" records up to {checkpoint} are archived)"
    )


def _verification_failed(problem: str, repairable: bool) -> AuditVerificationError:
    text = f"audit log verification failed: {problem}"
    if repairable:
        text += (
            "; 'envfs kms audit --repair --archive FILE', run as the store's owner, moves it"
            " aside (until then no call can be audited)"
        )
    return AuditVerificationError(text)


def _audit_verify(args: argparse.Namespace) -> int:
    with open_backend(args, due_tasks=False) as backend:
        result = backend.call("VerifyAudit", {})
    if not result.get("Valid"):
        raise _verification_failed(
            result.get("Problem") or "unknown problem", bool(result.get("Repairable"))
        )
    if args.output is None and args.query is None:
        sys.stdout.write(_verified_line(result) + "\n")
    else:
        # An output format asked for: the VerifyAudit answer itself, for scripts.
        print_answer(args, result, "VerifyAudit")
    return 0


def _audit_archive(args: argparse.Namespace) -> int:
    result = _owner_call(
        args,
        lambda service, caller: service.archive_audit_records(
            caller, args.archive, before=args.before, keep=args.keep
        ),
    )
    out = sys.stdout
    checkpoint = result["Checkpoint"]
    if result["Archive"] is None:
        out.write(
            f"nothing to archive: the log holds records {checkpoint + 1} to {result['Seq']}\n"
        )
        return 0
    out.write(
        f"archived records {result['FirstRecord']} to {result['LastRecord']}"
        f" ({result['Records']} records) to {result['Archive']}\n"
        f"sha256 {result['Sha256']}\n"
        f"the log now holds records {checkpoint + 1} to {result['Seq']}, from the checkpoint"
        f" at record {checkpoint}\n"
    )
    return 0


def _audit_repair(args: argparse.Namespace) -> int:
    result = _owner_call(args, lambda service, caller: service.repair_audit(caller, args.archive))
    out = sys.stdout
    if result["Problem"] is None:
        out.write("nothing to repair: the audit log can take records\n")
    else:
        out.write(f"repaired: {result['Problem']}\n")
        if result["Archive"] is not None:
            out.write(
                f"moved {_rows(result['Moved'])} to {result['Archive']}"
                f" (sha256 {result['Sha256']})\n"
            )
        out.write(
            f"the audit head is record {result['Head']}; record {result['Seq']} tells of"
            " this repair\n"
        )
    if not result["Valid"]:
        raise _verification_failed(result["Remaining"], False)
    out.write(_verified_line(result) + "\n")
    return 0


def _audit_verify_archives(args: argparse.Namespace) -> int:
    result = _owner_call(
        args, lambda service, caller: service.verify_audit_archives(caller, args.verify_archive)
    )
    out = sys.stdout
    for entry in result["Archives"]:
        name = entry["File"]
        if entry["Problem"] is not None:
            out.write(f"{name}: {entry['Problem']}\n")
        elif entry["Kind"] == "quarantined":
            out.write(
                f"{name}: {_rows(entry['Records'])} moved aside by a repair of the log at"
                f" record {entry['Start']}: {len(entry['Linked'])} continue the chain,"
                f" {len(entry['Unlinked'])} were not written by this key service or are out"
                " of place\n"
            )
        else:
            out.write(
                f"{name}: records {entry['FirstRecord']} to {entry['LastRecord']}"
                f" ({entry['Records']} records) verify\n"
            )
    for note in result["Notes"]:
        out.write(f"{note}\n")
    if not result["Valid"]:
        problem = result["Problem"] or next(
            f"{e['File']}: {e['Problem']}" for e in result["Archives"] if e["Problem"]
        )
        raise AuditVerificationError(f"audit archive verification failed: {problem}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    mode = _audit_mode(args)
    if mode == "verify":
        return _audit_verify(args)
    if mode == "archive":
        return _audit_archive(args)
    if mode == "repair":
        return _audit_repair(args)
    if mode == "verify-archive":
        return _audit_verify_archives(args)
    with open_backend(args) as backend:
        records: list[Any] = []
        params: dict[str, Any] = {}
        if args.key_id:
            params["KeyId"] = args.key_id
        if args.since:
            params["Since"] = args.since
        while True:
            page = backend.call("ListAuditRecords", params)
            records.extend(page.get("Records", []))
            marker = page.get("NextMarker")
            if not page.get("Truncated") or not marker:
                break
            params["Marker"] = marker
    print_answer(args, {"Records": records}, "ListAuditRecords")
    return 0


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number 0 or more, got {text!r}")
    return value


# --- the parser ----------------------------------------------------------------------------


def _description(operation: Operation) -> str:
    text = operation.help
    return f"{text[:1].upper()}{text[1:]} (the {operation.name} operation)."


def add_parser(commands: Any) -> None:
    """Add ``kms`` and its verbs to the top-level subcommands ``commands``."""
    formatter = argparse.RawDescriptionHelpFormatter
    kms = commands.add_parser(
        "kms",
        help="the regional key service (AWS KMS verbs)",
        description="The regional key management service: master keys, data keys, policies"
        " and audit, with the verbs and flags of 'aws kms'.",
    )
    verbs = kms.add_subparsers(dest="verb", metavar="VERB", required=True, title="verbs")

    init = verbs.add_parser(
        "init",
        help="create the key store of a region",
        description="Create the key store of a region. Without a passphrase, a random root key"
        " is written beside the store (mode 0600): keep it secret and back it up.",
        formatter_class=formatter,
    )
    init.add_argument(
        "--passphrase",
        action="store_true",
        help="derive the root key from a passphrase asked twice on the terminal",
    )
    init.add_argument(
        "--key-creators-group",
        metavar="NAME",
        default=DEFAULT_KEY_CREATORS_GROUP,
        help="the Unix group whose members (with root) may create keys"
        f" (default {DEFAULT_KEY_CREATORS_GROUP!r})",
    )
    _add_store_options(init)
    init.set_defaults(handler=_init)

    serve = verbs.add_parser(
        "serve",
        help="run the key-service daemon on a Unix socket",
        description="Run the key-service daemon of a region on a Unix socket; callers are"
        " identified by the kernel (SO_PEERCRED). SIGINT or SIGTERM stop it. Under systemd"
        " it takes its socket from socket activation (LISTEN_FDS) when given one, and"
        " reports readiness to NOTIFY_SOCKET (Type=notify).",
    )
    _add_socket_option(serve, "where to listen")
    serve.add_argument(
        "--trust-on-behalf-of",
        metavar="UID=NAME",
        action="append",
        type=_trusted_service,
        help="trust processes of uid UID to call on behalf of other users, as the service"
        " NAME (what key policies see as kms:ViaService); repeatable. Default: 0=envfs-mount"
        " (root's mount daemons). 'none' trusts nobody",
    )
    limits = serve.add_argument_group(
        "limits",
        "Per uid (connections count for the uid that connects, calls for the user they are"
        " made for), checked before any other work. A refused connection or call is"
        " answered LimitExceededException or ThrottlingException"
        " (exit 22 or 29 in the CLI) and costs no audit record of its own: every 10 s, one"
        " record per uid (operation ThrottleSummary) counts what was refused. RATE[:BURST]"
        " is events per second with bursts of up to BURST (default twice RATE); 'off' is no"
        " limit.",
    )
    defaults = Limits()
    limits.add_argument(
        "--max-connections",
        metavar="N",
        type=_count,
        default=256,
        help="connections served at once; more wait in the listen backlog (default 256)",
    )
    limits.add_argument(
        "--max-connections-per-uid",
        metavar="N",
        type=_count,
        default=defaults.max_connections_per_uid,
        help="connections one uid may hold at once; more are refused"
        f" (default {defaults.max_connections_per_uid})",
    )
    for flag, default, what in (
        ("--uid-connection-rate", defaults.connection_rate, "new connections a second per uid"),
        ("--uid-call-rate", defaults.call_rate, "calls a second per uid"),
        (
            "--uid-failure-rate",
            defaults.failure_rate,
            "calls ending in an error (denied, not found, invalid...) a second per uid;"
            " while a uid is over it, all its calls are refused",
        ),
    ):
        limits.add_argument(
            flag,
            metavar="RATE[:BURST]",
            type=_rate,
            default=default,
            help=f"{what} (default {default})",
        )
    limits.add_argument(
        "--idle-timeout",
        metavar="SECONDS",
        type=_seconds,
        default=60.0,
        help="close a connection idle this long between requests (default 60)",
    )
    http = serve.add_argument_group(
        "HTTP endpoint",
        "Also serve AWS KMS's own protocol (JSON 1.1 over HTTP/1.1, as 'aws kms' and boto3"
        " speak it, with --endpoint-url) for requests signed (AWS Signature Version 4) with"
        " an access key of a Unix user (envfs kms create-access-key): each is decided and"
        " audited as that user. The signing region is the store's region.",
    )
    http.add_argument(
        "--listen-http",
        metavar="HOST:PORT",
        type=_address,
        help="listen on HOST:PORT ([::1]:PORT for IPv6; port 0 picks one, logged); TLS is"
        " required unless HOST is a loopback address",
    )
    http.add_argument(
        "--tls-cert",
        metavar="FILE",
        type=Path,
        help="the server's certificate chain, PEM (e.g. a systemd credential: %%d/tls.crt)",
    )
    http.add_argument(
        "--tls-key",
        metavar="FILE",
        type=Path,
        help="the certificate's private key, PEM, unencrypted (e.g. %%d/tls.key)",
    )
    http.add_argument(
        "--http-connections-per-address",
        metavar="N",
        type=_count,
        default=32,
        help="connections one client address may hold at once; more are closed (default 32)",
    )
    http.add_argument(
        "--http-failure-rate",
        metavar="RATE[:BURST]",
        type=_rate,
        default=Rate(5.0, 50.0),
        help="requests with a failed signature a second per client address; past it the"
        " address's requests are refused (ThrottlingException) before any check (default"
        " 5:50)",
    )
    _add_store_options(serve)
    serve.set_defaults(handler=_serve)

    audit = verbs.add_parser(
        "audit",
        help="list, verify, archive or repair the audit log",
        description="List the audit records (every call, allowed or denied), or verify the"
        " log's MAC chain. As the store's owner (these open the store directly, never"
        " through the daemon): archive old records to a file and delete them from the log"
        " (the log then verifies from a signed checkpoint, and archives verify and chain to"
        " each other and to it), verify archives, or repair a log that cannot take records"
        " by moving the damage to a file. Root and the key creators group only.",
        epilog=_EXAMPLES["audit"],
        formatter_class=formatter,
    )
    group = audit.add_argument_group("listing")
    group.add_argument("--key-id", metavar="KEY_ID", help="only records about this key")
    group.add_argument(
        "--since", metavar="TIME", help="only records from TIME on (ISO 8601 or epoch seconds)"
    )
    group = audit.add_argument_group("verifying")
    group.add_argument(
        "--verify",
        action="store_true",
        help="check that no record was altered, added or removed: 'audit log verified: N"
        " records' (with --output or --query the VerifyAudit answer: Valid, Records,"
        " Problem...), else exit 40 naming the damaged record and what is wrong",
    )
    group.add_argument(
        "--verify-archive",
        metavar="FILE",
        nargs="+",
        type=Path,
        help="check archives made by --archive or --repair with this store's key, and that"
        " they chain to each other and to the log (exit 40 if one does not verify)",
    )
    group = audit.add_argument_group("retention and repair (the store's owner)")
    group.add_argument(
        "--archive",
        metavar="FILE",
        type=Path,
        help="write the records to remove to FILE (new, or left by an interrupted run),"
        " fsynced before they leave the log; with --before or --keep, or --repair",
    )
    group.add_argument(
        "--before",
        metavar="TIME",
        help="archive the oldest records up to the first one at or after TIME (ISO 8601,"
        " UTC if no zone, or epoch seconds)",
    )
    group.add_argument(
        "--keep",
        metavar="N",
        type=_non_negative,
        help="archive every record but the newest N",
    )
    group.add_argument(
        "--repair",
        action="store_true",
        help="when the log cannot take records (rows after its head, a missing or altered"
        " head), move those rows to --archive FILE and fix the head; damage before the head"
        " stays as evidence",
    )
    _add_client_options(audit)
    audit.set_defaults(handler=_audit)

    for operation in OPERATIONS.values():
        if operation.name in _AUDIT_OPERATIONS:
            continue
        sub = verbs.add_parser(
            operation.verb,
            help=operation.help,
            description=_description(operation),
            epilog=_EXAMPLES.get(operation.verb),
            formatter_class=formatter,
        )
        group = sub.add_argument_group("parameters")
        for param in operation.params:
            _add_param(group, param)
        _add_client_options(sub)
        sub.set_defaults(handler=partial(_run_operation, operation))
