"""Volume configurations: ``/etc/envfs/volumes/NAME.toml``, what ``envfs mount --config`` reads.

One file per volume, named after it. The directory is ``$ENVFS_CONFIG_DIR`` when set, else
``/etc/envfs/volumes`` (the command line's ``--config-dir`` overrides both). The format
(every key is documented in ``docs/systemd.md``)::

    backing = "/srv/data.envfs"      # required: the volume's backing folder
    mountpoint = "/srv/data"         # required: where the plaintext view appears
    allow_other = true               # optional, default false
    options = ["noatime"]            # optional: extra FUSE -o options, default none
    log_file = "/var/log/envfs.log"  # optional: default stderr (the journal under systemd)
    busy_poll = 50                   # optional: µs, 0 to 10000 (envfs mount --busy-poll)

    [kms]                            # optional table
    region = "eu-west-1"             # default: the volume's region
    service = "embedded"             # or "unix:/run/envfs/kms-eu-west-1.sock", "aws",
                                     # "https://kms.example.org:8443" (AWS KMS's API)
    dir = "/var/lib/envfs/kms"       # embedded only: where region stores live
    passphrase_file = "/etc/envfs/pass"  # embedded only: the store's passphrase
    credentials = "/etc/envfs/aws-users.toml"  # aws/https only, required: who is which
                                     # AWS identity (keys/awscreds.py; docs/fleet.md)
    ca_bundle = "/etc/envfs/fleet-ca.pem"  # https only: the CA certificates to trust
    key_arn = "arn:aws:kms:eu-west-1:111122223333:key/KEY-ID"  # optional: the key the
                                     # volume file must name (envfs mount --key-arn)

The file, the folders on its way and the symlinks followed must belong to root (or the user
running envfs) and be writable by no one else, as a credential mapping
(:func:`envfs.keys.awscreds.check_trusted`). Anything else is refused, never ignored: an
unknown key, a value of the wrong type, a relative path, a malformed region, a key service
that is neither form. Each refusal is a
:class:`~envfs.errors.ConfigError` naming the file, the key and the reason.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envfs.arn import parse_key_arn, validate_region
from envfs.errors import ConfigError, KMSError, ValidationException
from envfs.files.mountopts import BUSY_POLL_MAX_US
from envfs.keys.awscreds import check_trusted
from envfs.keys.choice import EMBEDDED, KeyServiceChoice

_describe = ConfigError.describe  # a value as messages quote it

DEFAULT_CONFIG_DIR = Path("/etc/envfs/volumes")

# Why a mount on a key service elsewhere must be told its volume's key.
PIN_WHY = (
    "the volume file is authenticated by the key it names, and with keys in AWS KMS or on a"
    " key server, whoever may write the backing folder may have some key of their own to"
    " name; give the key `envfs init` printed (`envfs info BACKING` shows it)"
)

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_TOP_KEYS = ("backing", "mountpoint", "allow_other", "options", "log_file", "busy_poll", "kms")
_KMS_KEYS = (
    "region",
    "service",
    "dir",
    "passphrase_file",
    "credentials",
    "ca_bundle",
    "key_arn",
)


@dataclass(frozen=True)
class VolumeConfig:
    """One volume as its configuration file describes it."""

    name: str
    source: Path  # the file it was read from, for messages
    backing: Path
    mountpoint: Path
    region: str | None  # None: the volume's own region
    kms: str  # "embedded" or "unix:/absolute/path.sock"
    kms_dir: Path | None
    passphrase_file: Path | None
    allow_other: bool
    options: tuple[str, ...]  # FUSE -o options
    log_file: Path | None
    busy_poll: int | None = None  # µs; None: the mount's default
    kms_credentials: Path | None = None  # aws/https: the credential mapping file
    kms_ca_bundle: Path | None = None  # https: CA certificates to trust
    kms_key_arn: str | None = None  # the key the volume file must name

    @property
    def kms_socket(self) -> Path | None:
        """The key daemon's socket when ``kms`` names one, else None (embedded)."""
        return KeyServiceChoice.parse(self.kms).socket


def config_dir(override: Path | str | None = None) -> Path:
    """``override``, else ``$ENVFS_CONFIG_DIR``, else ``/etc/envfs/volumes``."""
    if override:
        return Path(override)
    return Path(os.environ.get("ENVFS_CONFIG_DIR") or DEFAULT_CONFIG_DIR)


def validate_name(name: str) -> str:
    """Return ``name`` if it can name a volume configuration (and a systemd instance).

    Raises:
        ConfigError: it holds something other than ``[A-Za-z0-9_.-]``, or starts with
            ``.`` or ``-`` (no ``..``, nothing an option parser would take for a flag).
    """
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"volume name {name!r} is not valid: expected 1-128 letters, digits, '_', '.' or"
            " '-', not starting with '.' or '-'"
        )
    return name


def load(name: str, directory: Path | str | None = None) -> VolumeConfig:
    """Read and check ``DIR/NAME.toml``.

    Raises:
        ConfigError: a bad name, an unreadable or unparsable file, or any bad key.
    """
    path = config_dir(directory) / f"{validate_name(name)}.toml"
    try:
        os.lstat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such volume configuration") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    # It says which key service to trust with every data key, which credentials to use
    # and which key the volume file must name: it is trusted as the credential mapping is.
    raw = check_trusted(path.absolute(), secret=False)
    try:
        data = tomllib.loads(raw.decode())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(name, path, data)


def parse(name: str, path: Path, data: dict[str, Any]) -> VolumeConfig:
    """Check a parsed TOML document; ``path`` is named in every message.

    Raises:
        ConfigError: the first bad key, in file order.
    """
    reader = _Reader(path)
    reader.refuse_unknown(data, _TOP_KEYS, "")
    kms_table = data.get("kms", {})
    if not isinstance(kms_table, dict):
        raise reader.error("kms", f"expected a table, got {_describe(kms_table)}")
    reader.refuse_unknown(kms_table, _KMS_KEYS, "kms.")
    backing = reader.path(data, "backing", required=True)
    mountpoint = reader.path(data, "mountpoint", required=True)
    assert backing is not None and mountpoint is not None
    kms = reader.string(kms_table, "kms.service", "service") or EMBEDDED
    try:
        choice = KeyServiceChoice.parse(kms)
    except ValueError:
        raise reader.error(
            "kms.service",
            "expected 'embedded', 'unix:' and an absolute socket path, 'aws' or"
            f" 'https://HOST[:PORT]', got {kms!r}",
        ) from None
    credentials = reader.path(kms_table, "kms.credentials", key="credentials")
    ca_bundle = reader.path(kms_table, "kms.ca_bundle", key="ca_bundle")
    if choice.aws and credentials is None:
        raise reader.error(
            "kms.credentials", f"missing: service = {kms!r} needs a credential mapping file"
        )
    if not choice.aws and credentials is not None:
        raise reader.error("kms.credentials", "applies only to service = 'aws' or an https URL")
    if choice.endpoint is None and ca_bundle is not None:
        raise reader.error("kms.ca_bundle", "applies only to service = an https URL")
    key_arn = reader.string(kms_table, "kms.key_arn", "key_arn")
    if choice.aws and key_arn is None:
        raise reader.error("kms.key_arn", f"missing: service = {kms!r} needs it: {PIN_WHY}")
    if key_arn is not None:
        try:
            parse_key_arn(key_arn)
        except KMSError as exc:
            raise reader.error("kms.key_arn", exc.message) from None
    kms_dir = reader.path(kms_table, "kms.dir", key="dir")
    passphrase_file = reader.path(kms_table, "kms.passphrase_file", key="passphrase_file")
    if kms != EMBEDDED:
        for shown, value in (("kms.dir", kms_dir), ("kms.passphrase_file", passphrase_file)):
            if value is not None:
                raise reader.error(shown, "applies only to service = 'embedded'")
    return VolumeConfig(
        name=name,
        source=path,
        backing=backing,
        mountpoint=mountpoint,
        region=reader.region(kms_table),
        kms=kms,
        kms_dir=kms_dir,
        passphrase_file=passphrase_file,
        allow_other=reader.boolean(data, "allow_other"),
        options=reader.options(data),
        log_file=reader.path(data, "log_file"),
        busy_poll=reader.busy_poll(data),
        kms_credentials=credentials,
        kms_ca_bundle=ca_bundle,
        kms_key_arn=key_arn,
    )


class _Reader:
    """Typed getters whose refusals name the file and the (dotted) key."""

    def __init__(self, path: Path) -> None:
        self.source = path

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.source}: key {key!r}: {reason}")

    def refuse_unknown(self, table: dict[str, Any], known: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key not in known:
                allowed = ", ".join(k for k in known)
                raise self.error(prefix + key, f"unknown key (known: {allowed})")

    def string(self, table: dict[str, Any], shown: str, key: str | None = None) -> str | None:
        value = table.get(key or shown)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.error(shown, f"expected a non-empty string, got {_describe(value)}")
        return value

    def path(
        self, table: dict[str, Any], shown: str, *, key: str | None = None, required: bool = False
    ) -> Path | None:
        value = table.get(key or shown)
        if value is None:
            if required:
                raise self.error(shown, "missing (an absolute path is required)")
            return None
        if not isinstance(value, str) or not os.path.isabs(value) or "\0" in value:
            raise self.error(shown, f"expected an absolute path, got {_describe(value)}")
        return Path(value)

    def boolean(self, table: dict[str, Any], key: str) -> bool:
        value = table.get(key, False)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_describe(value)}")
        return value

    def options(self, table: dict[str, Any]) -> tuple[str, ...]:
        value = table.get("options", [])
        if not isinstance(value, list) or not all(
            isinstance(opt, str) and opt and "," not in opt for opt in value
        ):
            raise self.error(
                "options",
                'expected a list of FUSE options like ["noatime"], one option per string,'
                f" got {_describe(value)}",
            )
        return tuple(value)

    def busy_poll(self, table: dict[str, Any]) -> int | None:
        value = table.get("busy_poll")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(
                "busy_poll",
                f"expected a whole number of microseconds, got {_describe(value)}",
            )
        if not 0 <= value <= BUSY_POLL_MAX_US:
            raise self.error(
                "busy_poll", f"expected 0 to {BUSY_POLL_MAX_US} microseconds, got {value}"
            )
        return value

    def region(self, table: dict[str, Any]) -> str | None:
        value = self.string(table, "kms.region", "region")
        if value is None:
            return None
        try:
            return validate_region(value)
        except ValidationException:
            raise self.error(
                "kms.region",
                "expected lowercase letters, digits and dashes, starting with a letter, like"
                f" 'eu-west-1', got {value!r}",
            ) from None
