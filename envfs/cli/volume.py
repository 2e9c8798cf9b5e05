"""``envfs init``, ``envfs mount``, ``envfs umount``, ``envfs inspect`` and ``envfs info``.

``envfs mount`` without ``--foreground`` starts the mount daemon in the background and
returns only once the mount is live (or with the daemon's error): the daemon reports
through a pipe whose descriptor it gets with the hidden ``--ready-fd`` option.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from envfs import notify
from envfs.arn import parse_arn
from envfs.cli import config
from envfs.cli.common import (
    add_output_options,
    configure_logging,
    key_arn_type,
    print_answer,
    region_type,
)
from envfs.cli.kms import open_store
from envfs.errors import EnvfsError, IntegrityError, KMSError, MountError, UsageError
from envfs.files import fileformat, mountopts
from envfs.files.volume import Volume
from envfs.identity import Caller
from envfs.keys.choice import KeyServiceChoice, KeyServiceConnection, connect
from envfs.kms.model import DEFAULT_REGION

log = logging.getLogger("envfs")

_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "KI": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MI": 1 << 20}


def parse_block_size(text: str) -> int:
    """``16K`` -> 14 (the block shift). Powers of two from 4 KiB to 1 MiB."""
    digits = text.rstrip("KkMmIiBb")
    suffix = text[len(digits) :].upper()
    if not digits.isdigit() or suffix not in _SIZE_SUFFIXES:
        raise argparse.ArgumentTypeError(f"block size {text!r} is not a size like 16K")
    size = int(digits) * _SIZE_SUFFIXES[suffix]
    shift = size.bit_length() - 1
    if size != 1 << shift or not fileformat.MIN_BLOCK_SHIFT <= shift <= fileformat.MAX_BLOCK_SHIFT:
        raise argparse.ArgumentTypeError(
            f"block size {text!r} must be a power of two from 4K to 1M"
        )
    return shift


def _add_kms_options(parser: argparse.ArgumentParser, *, region_help: str) -> None:
    group = parser.add_argument_group("key service options")
    group.add_argument("--region", type=region_type, default=None, help=region_help)
    group.add_argument(
        "--kms-dir",
        metavar="DIR",
        type=Path,
        default=os.environ.get("ENVFS_KMS_DIR") or None,
        help="where region key stores live (env ENVFS_KMS_DIR)",
    )
    group.add_argument(
        "--passphrase-file",
        metavar="FILE",
        default=os.environ.get("ENVFS_KMS_PASSPHRASE_FILE") or None,
        help="the key store's passphrase, if it has one (env ENVFS_KMS_PASSPHRASE_FILE)",
    )
    group.add_argument(
        "--kms",
        metavar="SERVICE",
        type=kms_service_type,
        default=os.environ.get("ENVFS_KMS") or "embedded",
        help="'embedded' (open the region's store in this process; default),"
        " 'unix:PATH' (a key-service daemon's socket, called on behalf of each user),"
        " 'aws' (AWS KMS) or 'https://HOST[:PORT]' (AWS KMS's API elsewhere: another"
        " machine's envfs key service), called with each user's AWS identity from"
        " --kms-credentials (env ENVFS_KMS)",
    )
    group.add_argument(
        "--kms-credentials",
        metavar="FILE",
        type=Path,
        default=None,
        help="with --kms aws or https://...: the file mapping Unix users and groups to AWS"
        " identities (owned by root or you, writable by no one else; see docs/fleet.md)",
    )
    group.add_argument(
        "--kms-ca-bundle",
        metavar="FILE",
        type=Path,
        default=None,
        help="with --kms https://...: the CA certificates to trust (default: the system's)",
    )
    group.add_argument(
        "--key-cache-seconds",
        metavar="SECONDS",
        type=float,
        default=None,
        help="reuse a user's unwrapped data key for that user's re-opens this long without"
        " asking the key service; policy changes take effect for new opens within it"
        f" (default {DEFAULT_KEY_CACHE_SECONDS:g} with a daemon, 0 embedded: every open asks)",
    )
    group.add_argument(
        "--key-pool-size",
        metavar="N",
        type=int,
        default=None,
        help="data keys made in advance per user so that creates need no round trip, each"
        " usable for --key-cache-seconds (default 4 with a daemon; the embedded store"
        " cannot make them in the background, so 0)",
    )
    group.add_argument(
        "--kms-timeout",
        metavar="SECONDS",
        type=float,
        default=10.0,
        help="how long a call to a key-service daemon or AWS KMS may take (default 10)",
    )


DEFAULT_KEY_CACHE_SECONDS = 30.0  # with a key-service daemon; 0 with the embedded store


def _key_cache_seconds(args: argparse.Namespace) -> float:
    if args.key_cache_seconds is not None:
        return float(args.key_cache_seconds)
    return DEFAULT_KEY_CACHE_SECONDS if KeyServiceChoice.parse(args.kms).remote else 0.0


DEFAULT_KEY_POOL_SIZE = 4  # per user, with a key-service daemon; none with the embedded store


def _key_pool_size(args: argparse.Namespace) -> int:
    daemon = KeyServiceChoice.parse(args.kms).remote
    if args.key_pool_size is not None:
        if args.key_pool_size and not daemon:
            raise UsageError(
                "argument --key-pool-size: only a key-service daemon (--kms unix:PATH) or"
                " AWS KMS can make data keys in advance"
            )
        return int(args.key_pool_size)
    return DEFAULT_KEY_POOL_SIZE if daemon else 0


def kms_service_type(text: str) -> str:
    """argparse type of ``--kms``: ``embedded`` or ``unix:/absolute/path``."""
    try:
        KeyServiceChoice.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"key service {exc}") from None
    return text


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("volume configuration")
    group.add_argument(
        "--config",
        metavar="NAME",
        help="take the volume from the configuration file NAME.toml (instead of BACKING and"
        " MOUNTPOINT; see docs/systemd.md)",
    )
    group.add_argument(
        "--config-dir",
        metavar="DIR",
        type=Path,
        default=None,
        help="where configuration files live (env ENVFS_CONFIG_DIR; default /etc/envfs/volumes)",
    )


def busy_poll_type(text: str) -> int:
    """argparse type of ``--busy-poll``: whole microseconds, 0 to the configuration's bound."""
    if not re.fullmatch(r"[0-9]{1,6}", text) or int(text) > mountopts.BUSY_POLL_MAX_US:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of microseconds from 0 to {mountopts.BUSY_POLL_MAX_US}"
        )
    return int(text)


def _add_busy_poll_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--busy-poll",
        metavar="MICROSECONDS",
        type=busy_poll_type,
        default=None,
        help="after each answer, watch for the next request this long before sleeping:"
        " faster requests, paid in CPU time while they pause; 0: never"
        f" (default {mountopts.BUSY_POLL_DEFAULT_US}; see docs/mount.md)",
    )


def _connect(
    args: argparse.Namespace,
    region: str,
    *,
    batch_audit: bool = False,
    key_arn: str | None = None,
    backing: Path | None = None,
    mountpoint: Path | None = None,
) -> KeyServiceConnection:
    """The key service of ``region`` that ``--kms`` names; ``batch_audit``: an embedded
    service batches its audit records (the mount); ``key_arn``: the volume's key, whose
    partition says whether an AWS KMS API is an envfs key service (``arn:envfs:``);
    ``backing``, ``mountpoint``: the volume's folder and a mount's, where no credential
    mapping may be.

    Raises:
        UsageError: --kms-credentials or --kms-ca-bundle without a key service that uses it.
    """
    choice = KeyServiceChoice.parse(args.kms)
    if args.kms_credentials is not None and not choice.aws:
        raise UsageError("argument --kms-credentials: only with --kms aws or https://...")
    if args.kms_ca_bundle is not None and choice.endpoint is None:
        raise UsageError("argument --kms-ca-bundle: only with --kms https://...")
    store_args = argparse.Namespace(
        region=region, kms_dir=args.kms_dir, passphrase_file=args.passphrase_file
    )
    return connect(
        choice,
        region,
        open_store=lambda: open_store(store_args),
        timeout=args.kms_timeout,
        batch_audit=batch_audit,
        credentials=args.kms_credentials,
        ca_bundle=args.kms_ca_bundle,
        envfs_blobs=key_arn is not None and _partition(key_arn) == "envfs",
        backing=backing,
        mountpoint=mountpoint,
    )


def _partition(key_arn: str) -> str | None:
    """The partition of a key ARN (``envfs``, ``aws``...), None if it is not one."""
    try:
        return parse_arn(key_arn).partition
    except KMSError:
        return None


# --- init ----------------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    key_region = _key_region(args.key_id)
    if key_region is not None and args.region and args.region != key_region:
        raise UsageError(
            f"--key-id {args.key_id!r} is in region {key_region!r}, not --region {args.region!r}"
        )
    region = key_region or args.region or os.environ.get("ENVFS_REGION") or DEFAULT_REGION
    with _connect(args, region, key_arn=args.key_id, backing=Path(args.backing)) as kms:
        volume = Volume.create(
            Path(args.backing),
            args.key_id,
            kms.provider,
            Caller.current(),
            block_shift=args.block_size,
            encrypted_names=not args.plaintext_names,
        )
    sys.stdout.write(
        f"envfs volume {volume.volume_id} created in {str(volume.backing)!r}\n"
        f"  key:    {volume.key_arn}\n"
        f"  blocks: {volume.block_size} bytes\n"
        f"  names:  {'encrypted' if volume.encrypted_names else 'plaintext (--plaintext-names)'}\n"
        f"mount it with: envfs mount {shlex.quote(args.backing)} MOUNTPOINT"
        f" --key-arn {volume.key_arn}\n"
        "  (--key-arn: refuse a volume file naming any other key, as one put in its place"
        " by whoever may write the backing folder would)\n"
    )
    return 0


def _key_region(key_id: str) -> str | None:
    """The region an ARN names (a key's or an alias's); None for an id or alias name."""
    try:
        return parse_arn(key_id).region
    except KMSError:
        return None


# --- mount ---------------------------------------------------------------------------------


def _apply_config(args: argparse.Namespace, *, positionals: tuple[str, ...]) -> None:
    """``--config NAME``: fill ``args`` from ``/etc/envfs/volumes/NAME.toml`` (or
    ``--config-dir``). The file decides every key it sets; ``--allow-other`` and ``-o`` on
    the command line add to it. Without ``--config`` the positional arguments are required.

    Raises:
        UsageError: both or neither of ``--config`` and the positional arguments.
        ConfigError: the file is missing or wrong.
    """
    given = [name for name in positionals if getattr(args, name) is not None]
    shown = " ".join(name.upper() for name in positionals)
    if args.config is None:
        if len(given) != len(positionals):
            raise UsageError(f"give {shown}, or --config NAME")
        return
    if given:
        raise UsageError(f"--config NAME replaces {shown}: give one or the other")
    cfg = config.load(args.config, args.config_dir)
    args.backing, args.mountpoint = str(cfg.backing), str(cfg.mountpoint)
    if not hasattr(args, "foreground"):  # umount needs only the mount point
        return
    args.kms = cfg.kms
    args.region = cfg.region or args.region
    args.kms_dir = cfg.kms_dir or args.kms_dir
    args.kms_credentials = cfg.kms_credentials or args.kms_credentials
    args.kms_ca_bundle = cfg.kms_ca_bundle or args.kms_ca_bundle
    args.key_arn = cfg.kms_key_arn or args.key_arn
    args.passphrase_file = str(cfg.passphrase_file or "") or args.passphrase_file
    args.log_file = str(cfg.log_file or "") or args.log_file
    args.busy_poll = args.busy_poll if cfg.busy_poll is None else cfg.busy_poll
    args.allow_other = args.allow_other or cfg.allow_other
    args.o = [*cfg.options, *(args.o or [])]


def _mount(args: argparse.Namespace) -> int:
    from envfs.files import mount

    _apply_config(args, positionals=("backing", "mountpoint"))
    backing, mountpoint = Path(args.backing), Path(args.mountpoint)
    if KeyServiceChoice.parse(args.kms).aws and args.key_arn is None:
        raise UsageError(f"--kms {args.kms} needs --key-arn ARN: {config.PIN_WHY}")
    mountopts.check(args.o or [])
    if "allow_other" in mountopts.items(args.o or []):  # FUSE's spelling of --allow-other
        args.allow_other = True
        args.o = [item for item in mountopts.items(args.o) if item != "allow_other"]
    if not args.foreground:
        return _daemonize(args)
    # The background daemon (started with --ready-fd) has /dev/null for stderr: it logs to
    # --log-file, else to syslog, as documented.
    configure_logging(log_file=args.log_file, to_stderr=args.ready_fd is None)
    ready_fd: int | None = args.ready_fd

    def report(message: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, message.encode() + b"\n")
                os.close(ready_fd)
            ready_fd = None

    options = mount.MountOptions(allow_other=args.allow_other, extra=args.o or [])
    try:
        mount.check_mountpoint(mountpoint, nonempty=options.nonempty)
        volume = Volume.load(backing)
        if args.key_arn is not None:
            volume.require_key(args.key_arn)
        region = args.region or volume.region
        with _connect(
            args,
            region,
            batch_audit=True,
            key_arn=volume.key_arn,
            backing=backing,
            mountpoint=mountpoint,
        ) as kms:
            vfs = mount.prepare(
                volume,
                kms.provider,
                Caller.current(),
                multi_user=args.allow_other,
                key_cache_seconds=_key_cache_seconds(args),
                key_pool_size=_key_pool_size(args),
            )

            def ready() -> None:
                report("ready")
                notify.ready(f"mounted {backing} on {mountpoint}")

            def stopping() -> None:
                notify.stopping(f"unmounting {mountpoint}")

            mount.run_foreground(
                vfs,
                mountpoint,
                options,
                on_ready=ready,
                on_stopping=stopping,
                busy_poll_us=(
                    mountopts.BUSY_POLL_DEFAULT_US if args.busy_poll is None else args.busy_poll
                ),
            )
    except EnvfsError as exc:
        report(f"error {exc.exit_code} {type(exc).__name__} {exc.message}")
        raise
    return 0


def _daemonize(args: argparse.Namespace) -> int:
    """Start ``envfs mount --foreground`` in the background; wait until it is live."""
    read_fd, write_fd = os.pipe()
    command = [sys.executable, "-m", "envfs", "mount", "--foreground", "--ready-fd", str(write_fd)]
    command += [args.backing, args.mountpoint]
    for flag, value in (
        ("--region", args.region),
        ("--kms-dir", args.kms_dir),
        ("--passphrase-file", args.passphrase_file),
        ("--log-file", args.log_file),
        ("--kms", args.kms),
        ("--kms-credentials", args.kms_credentials),
        ("--kms-ca-bundle", args.kms_ca_bundle),
        ("--key-arn", args.key_arn),
        ("--kms-timeout", args.kms_timeout),
        ("--key-cache-seconds", args.key_cache_seconds),
        ("--key-pool-size", args.key_pool_size),
    ):
        if value is not None and value != "":  # 0 too: --key-cache-seconds 0 means "none"
            command += [flag, str(value)]
    if args.busy_poll is not None:  # 0 too
        command += ["--busy-poll", str(args.busy_poll)]
    if args.allow_other:
        command.append("--allow-other")
    for opt in args.o or []:
        command += ["-o", opt]
    env = dict(os.environ)
    if not args.log_file:
        env.pop("JOURNAL_STREAM", None)
    # Readiness is ours to report (when the child says it is live), not the child's.
    env.pop("NOTIFY_SOCKET", None)
    try:
        child = subprocess.Popen(  # the daemon outlives us: no context manager
            command,
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        answer = pipe.read().decode(errors="replace").strip()
    if answer == "ready":
        return 0
    if answer.startswith("error "):
        _, code, kind, message = [*answer.split(" ", 3), "", "", ""][:4]
        kms_error = KMSError.registry.get(kind)
        if kms_error is not None:
            raise kms_error(message)  # printed with its AWS name, as in the foreground
        error = MountError(message or kind)
        error.exit_code = int(code) if code.isdigit() else MountError.exit_code  # type: ignore[misc]
        raise error
    status = child.wait()
    raise MountError(
        f"the mount daemon exited (status {status}) before the mount was live;"
        " run with --foreground to see why"
    )


def _umount(args: argparse.Namespace) -> int:
    from envfs.files import mount

    _apply_config(args, positionals=("mountpoint",))
    outcome = mount.unmount(Path(args.mountpoint), lazy=args.lazy)
    if outcome == "cleared":
        sys.stderr.write(
            f"envfs: cleared a dead mount on {args.mountpoint} (its daemon had stopped)\n"
        )
    elif outcome == "detached":
        sys.stderr.write(
            f"envfs: detached {args.mountpoint}; files still open there keep working, and its"
            " daemon ends when the last one is closed\n"
        )
    return 0


# --- inspect -------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    from envfs.keys.envfskms import read_wrapped

    path = Path(args.file)
    if path.is_dir():  # a volume's backing folder: the whole volume
        args.backing = args.file
        return _info(args)
    try:
        with path.open("rb") as f:
            raw = f.read(fileformat.HEADER_SIZE)
            backing = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise UsageError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    try:
        header = fileformat.FileHeader.parse(raw)
    except IntegrityError as exc:
        raise IntegrityError(f"{str(path)!r}: {exc.message}") from None
    info: dict[str, Any] = {
        "Path": str(path),
        "FormatVersion": header.version,
        "CipherSuite": "AES-256-GCM/HKDF-SHA256/HMAC-SHA256",
        "FileId": header.file_id.hex(),
        "KeyArn": header.key_arn,
        "BlockSize": header.block_size,
        "BackingSize": backing,
        "WrappedKeySize": len(header.wrapped_key),
    }
    opaque = _partition(header.key_arn) != "envfs"  # AWS KMS's blobs are not parsed
    wrapped = None if opaque else read_wrapped(header.wrapped_key)
    info["KeyVersion"] = None if wrapped is None else wrapped.key_version
    try:
        info["PlaintextSize"] = fileformat.plaintext_size(backing, header.block_shift)
    except IntegrityError as exc:
        info["PlaintextSize"] = None
        info["Problem"] = exc.message
    print_answer(args, info, "Inspect")
    return 0


# --- info ----------------------------------------------------------------------------------


def _info(args: argparse.Namespace) -> int:
    from envfs.files import info
    from envfs.keys.envfskms import read_wrapped

    partition = _partition(Volume.load(Path(args.backing)).key_arn)
    summary = info.summarize(Path(args.backing), read_wrapped if partition == "envfs" else None)
    volume = summary.volume
    answer: dict[str, Any] = {
        "Backing": str(volume.backing),
        "VolumeId": volume.volume_id,
        "Region": volume.region,
        "KeyArn": volume.key_arn,
        "KeyService": "envfs" if partition == "envfs" else f"AWS KMS (partition {partition})",
        "PreviousKeyArns": list(volume.previous_key_arns),
        "FormatVersion": volume.format_version,
        "BlockSize": volume.block_size,
        "Features": list(volume.features),
        "FileNames": "encrypted" if volume.encrypted_names else "plaintext",
        "CreationDate": volume.created,
        "Files": summary.files,
        "Directories": summary.directories,
        "Symlinks": summary.symlinks,
        "SpecialFiles": summary.special_files,
        "PlaintextSize": summary.plaintext_size,
        "BackingSize": summary.backing_size,
        "SparseFiles": summary.sparse_files,
        "KeyVersions": [
            {"KeyArn": arn, "KeyVersion": version, "Files": count}
            for (arn, version), count in sorted(
                summary.key_versions.items(), key=lambda item: (item[0][0], item[0][1] or 0)
            )
        ],
        "UnreadableFiles": summary.unreadable_files,
        "UnreadableDirectories": summary.unreadable_directories,
        "Leftovers": summary.leftovers,
        "Problems": [{"Path": p.path, "Problem": p.problem} for p in summary.problems],
    }
    print_answer(args, answer, "Info")
    return 0


# --- the parser ----------------------------------------------------------------------------


def add_parsers(commands: Any) -> None:
    init = commands.add_parser(
        "init",
        help="make an empty folder an encrypted volume",
        description="Make BACKING (an empty or new folder) an envfs volume whose files are"
        " encrypted with data keys under the master key --key-id.",
    )
    init.add_argument("backing", metavar="BACKING", help="the folder that will hold ciphertext")
    init.add_argument("--key-id", required=True, help="the master key: alias/NAME, id or ARN")
    init.add_argument(
        "--block-size",
        type=parse_block_size,
        default=fileformat.DEFAULT_BLOCK_SHIFT,
        metavar="SIZE",
        help="plaintext block size, a power of two from 4K to 1M (default 16K)",
    )
    init.add_argument(
        "--plaintext-names",
        action="store_true",
        help="store file and folder names, symlink targets and user.* xattrs as they are"
        " (default: encrypted, so the backing folder shows no name; only contents are"
        " encrypted with this option)",
    )
    _add_kms_options(
        init, region_help=f"the key's region (env ENVFS_REGION; default {DEFAULT_REGION})"
    )
    init.set_defaults(handler=_init)

    mount = commands.add_parser(
        "mount",
        help="mount a volume's plaintext view",
        description="Mount the plaintext view of the volume BACKING on MOUNTPOINT. Returns"
        " once the mount is live; the daemon runs in the background unless --foreground."
        " In the foreground under systemd (Type=notify) it reports readiness to"
        " NOTIFY_SOCKET once the mount is live; SIGTERM or SIGINT flush open files and"
        " unmount.",
    )
    mount.add_argument("backing", metavar="BACKING", nargs="?")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    _add_config_options(mount)
    mount.add_argument("--foreground", action="store_true", help="do not daemonize")
    mount.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users use the mount (as root: files belong to their creators, and"
        " each open is decided by the key policy for the opening user)",
    )
    mount.add_argument(
        "-o",
        action="append",
        metavar="OPT[,OPT...]",
        help="extra FUSE mount options; 'nonempty' (envfs's own) mounts over a folder that"
        " holds files, which is refused otherwise",
    )
    mount.add_argument("--log-file", metavar="FILE", help="log here (default: stderr in the"
                       " foreground, else syslog)")  # fmt: skip
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    _add_kms_options(mount, region_help="the key service's region (default: the volume's)")
    mount.add_argument(
        "--key-arn",
        type=key_arn_type,
        metavar="ARN",
        help="the key the volume file must name (refused otherwise): whoever may write the"
        " backing folder and use some key of their own could replace the whole volume file;"
        " required with --kms aws or a URL",
    )
    _add_busy_poll_option(mount)
    mount.set_defaults(handler=_mount)

    umount = commands.add_parser(
        "umount",
        help="unmount a volume",
        description="Unmount an envfs mount and wait until its daemon has finished. A dead"
        " envfs mount (its daemon was killed: 'Transport endpoint is not connected') is"
        " cleared.",
    )
    umount.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    umount.add_argument(
        "--lazy",
        action="store_true",
        help="if files are open there, detach the mount now (new opens no longer reach it;"
        " the daemon serves the open files and ends when the last is closed)",
    )
    _add_config_options(umount)
    umount.set_defaults(handler=_umount)

    inspect = commands.add_parser(
        "inspect",
        help="show a backing file's header",
        description="Show the header of an encrypted backing file (format, file id, master"
        " key and version, block size, plaintext size) without decrypting anything. Given a"
        " volume's backing folder, the same as 'envfs info'.",
    )
    inspect.add_argument("file", metavar="BACKING_FILE")
    add_output_options(inspect)
    inspect.set_defaults(handler=_inspect)

    info = commands.add_parser(
        "info",
        help="describe a whole volume",
        description="Describe the volume BACKING without decrypting anything and without the"
        " key service: its volume file (id, region, master key, format version, block size,"
        " features; read, not authenticated) and what its folder holds (files, folders and"
        " symlinks, total plaintext size, master key versions in use, files that cannot be"
        " used). The folder is walked without following any symlink.",
    )
    info.add_argument("backing", metavar="BACKING", help="the volume's backing folder")
    add_output_options(info)
    info.set_defaults(handler=_info)
