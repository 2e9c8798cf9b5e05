"""Which AWS identity acts for which Unix user: the credential mapping of a mount whose master
keys live in AWS KMS (or behind another AWS KMS-compatible endpoint, such as another
machine's envfs key service).

The mapping is a TOML file that the volume configuration (``credentials =`` in ``[kms]``) or
``envfs mount --kms-credentials FILE`` names; it never lives in the backing folder, which
whoever can write the backing store could edit to borrow someone else's identity::

    shared_credentials_file = "/etc/envfs/aws/credentials"  # AWS's INI format, profiles
    shared_config_file = "/etc/envfs/aws/config"            # optional, AWS's config format
    sts_endpoint_url = "https://sts.eu-west-1.amazonaws.com"  # optional: for role_arn
                                                  # (http:// only on loopback; verified
                                                  # with the system's CAs, or with the
                                                  # endpoint's CA bundle on its host)

    [[map]]
    principal = "user:alice"         # user:NAME, uid:N, group:NAME or gid:N
    profile = "alice"                # a profile of the files above, with static keys

    [[map]]
    principal = "group:finance"
    profile = "envfs"
    role_arn = "arn:aws:iam::111122223333:role/finance"  # optional: AssumeRole from profile
    role_session_name = "envfs-finance"                   # optional, default "envfs"

Who matches: a caller's *user* entries (``user:``, ``uid:``) are tried before any *group*
entry (``group:``, ``gid:``), each kind in file order; the first that matches is the
caller's. No entry matches everyone: a ``*`` would let every local account, daemons
included, act as one AWS identity, which is what the mapping exists to prevent. A caller
with no entry gets AccessDeniedException (EACCES).

Trust: the mapping file, the files it names and the folders on their way (also those
holding a symlink on the way) must belong to root or to the user running envfs and be
writable by nobody else, as must the symlinks followed; the credentials file (and a config
file holding keys) must be readable by its owner only. Only static keys of the named
profile are read (no environment variables, no instance metadata, no
``credential_process``, no SSO): the daemon runs as root and must not pick up an identity
from wherever it was started.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import ssl
import stat
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envfs.errors import ConfigError
from envfs.identity import Caller

MAX_ENTRIES = 256  # so the clients made for them are bounded too
_TOP_KEYS = ("shared_credentials_file", "shared_config_file", "sts_endpoint_url", "map")
_ENTRY_KEYS = ("principal", "profile", "role_arn", "role_session_name")
_PRINCIPAL_RE = re.compile(
    r"(user|group):[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\$?|(uid|gid):[0-9]{1,10}"
)

_describe = ConfigError.describe  # a value as messages quote it
_PROFILE_RE = re.compile(r"[A-Za-z0-9_.+=@-]{1,128}")
_ROLE_ARN_RE = re.compile(r"arn:[a-z][a-z0-9-]*:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}")
_SESSION_RE = re.compile(r"[\w+=,.@-]{2,64}")
_SECRET_KEYS = frozenset({"aws_secret_access_key", "aws_session_token"})


@dataclass(frozen=True)
class CredentialSource:
    """One entry of the mapping: the AWS identity that acts for the callers it matches."""

    index: int  # its place in the file: entries are told apart (and clients kept) by it
    principal: str
    profile: str
    role_arn: str | None = None
    role_session_name: str = "envfs"

    def describe(self) -> str:
        """For messages and logs: never a key, only names."""
        role = f" as role {self.role_arn}" if self.role_arn else ""
        return f"mapping {self.principal!r} (profile {self.profile!r}{role})"


@dataclass(frozen=True)
class StaticKeys:
    access_key: str
    secret_key: str = ""
    token: str | None = None

    def __repr__(self) -> str:  # never shows the secret or the token
        return f"StaticKeys(access_key={self.access_key!r})"


@dataclass(frozen=True)
class CredentialMapping:
    """The checked mapping file: entries in match order, and where their profiles live."""

    source: Path
    entries: tuple[CredentialSource, ...]
    credentials_file: Path | None = None
    config_file: Path | None = None
    sts_endpoint_url: str | None = None

    def source_for(self, caller: Caller) -> CredentialSource | None:
        """The entry that acts for ``caller``: its first user entry that matches, else its
        first group entry that matches, else None."""
        users = {f"uid:{caller.uid}"} | (
            {f"user:{caller.user_name}"} if caller.user_name else set()
        )
        groups = {f"gid:{g}" for g in {caller.gid, *caller.groups}}
        groups |= {f"group:{name}" for name in caller.group_names}
        for wanted in (users, groups):
            for entry in self.entries:
                if entry.principal in wanted:
                    return entry
        return None

    def static_keys(self, entry: CredentialSource) -> StaticKeys:
        """The access key of ``entry``'s profile, read now from the files the mapping names
        (checked again: they may have been replaced since the mapping was read).

        Raises:
            ConfigError: no such profile, or a profile without both keys.
        """
        for path, section in (
            (self.credentials_file, entry.profile),
            (
                self.config_file,
                "default" if entry.profile == "default" else f"profile {entry.profile}",
            ),
        ):
            if path is None:
                continue
            values = _read_ini(path, secret=path == self.credentials_file).get(section)
            if values is None:
                continue
            access = values.get("aws_access_key_id", "")
            secret = values.get("aws_secret_access_key", "")
            if not access or not secret:
                raise ConfigError(
                    f"{path}: profile {entry.profile!r} lacks aws_access_key_id or"
                    " aws_secret_access_key (only static keys are read)"
                )
            return StaticKeys(access, secret, values.get("aws_session_token") or None)
        raise ConfigError(
            f"{self.source}: {entry.describe()}: no such profile in"
            f" {', '.join(str(p) for p in (self.credentials_file, self.config_file) if p)}"
        )


def load_mapping(
    path: Path | str, *, backing: Path | None = None, mountpoint: Path | None = None
) -> CredentialMapping:
    """Read and check a credential mapping file and the files it names; none of them may
    be in ``backing`` (the volume's backing folder) or under ``mountpoint``, if given.

    Raises:
        ConfigError: the file or a file it names is missing, not trusted (see the module's
            docstring), in the backing folder, not valid TOML, or has an unknown key or a
            bad value; or an entry names a profile that is not there.
    """
    path = Path(path)
    if not path.is_absolute():
        raise ConfigError(f"credential mapping {str(path)!r}: expected an absolute path")
    _refuse_inside(path, backing, mountpoint)
    raw = check_trusted(path, secret=False).decode(errors="replace")
    try:
        data = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for key in data:
        if key not in _TOP_KEYS:
            raise _error(path, key, f"unknown key (known: {', '.join(_TOP_KEYS)})")
    files = {}
    for key in ("shared_credentials_file", "shared_config_file"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not os.path.isabs(value)):
            raise _error(path, key, f"expected an absolute path, got {_describe(value)}")
        files[key] = Path(value) if value else None
        _refuse_inside(files[key], backing, mountpoint)
    if files["shared_credentials_file"] is None and files["shared_config_file"] is None:
        raise _error(path, "shared_credentials_file", "missing (where the profiles' keys are)")
    sts = data.get("sts_endpoint_url")
    if sts is not None and (not isinstance(sts, str) or not re.fullmatch(r"https?://\S+", sts)):
        raise _error(path, "sts_endpoint_url", f"expected an http(s) URL, got {_describe(sts)}")
    if sts is not None:
        try:  # STS answers carry credentials: https, or http only on loopback
            sts = endpoint_url(sts)
        except ValueError as exc:
            raise _error(path, "sts_endpoint_url", str(exc)) from None
    entries = data.get("map", [])
    if not isinstance(entries, list) or not entries:
        raise _error(path, "map", "expected one or more [[map]] tables")
    if len(entries) > MAX_ENTRIES:
        raise _error(path, "map", f"at most {MAX_ENTRIES} entries, got {len(entries)}")
    parsed = tuple(_entry(path, i, entry) for i, entry in enumerate(entries))
    seen: set[str] = set()
    for entry in parsed:
        if entry.principal in seen:
            raise _error(path, "map.principal", f"{entry.principal!r} is mapped twice")
        seen.add(entry.principal)
    mapping = CredentialMapping(
        path, parsed, files["shared_credentials_file"], files["shared_config_file"], sts
    )
    for entry in parsed:  # every profile is there now, not first at someone's open
        mapping.static_keys(entry)
    return mapping


def endpoint_url(text: str) -> str:
    """``text``, an ``https://HOST[:PORT]`` or ``http://LOOPBACK[:PORT]`` URL, normalized.

    Raises:
        ValueError: anything else (plain http elsewhere: the answers carry secrets).
    """
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError:
        raise ValueError(f"{text!r} is not a valid URL") from None
    if (
        not url.hostname
        or url.username
        or url.password
        or url.query
        or url.fragment
        or url.path not in ("", "/")
    ):
        raise ValueError(f"{text!r}: expected https://HOST[:PORT], without user, query or path")
    if url.scheme == "http" and not _loopback(url.hostname):
        raise ValueError(
            f"{text!r}: plain http only on loopback (the answers carry data keys or credentials);"
            " use https://"
        )
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    return f"{url.scheme}://{host}" + (f":{port}" if port is not None else "")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _entry(path: Path, index: int, entry: Any) -> CredentialSource:
    shown = f"map[{index}]"
    if not isinstance(entry, dict):
        raise _error(path, shown, f"expected a table, got {_describe(entry)}")
    for key in entry:
        if key not in _ENTRY_KEYS:
            raise _error(path, f"{shown}.{key}", f"unknown key (known: {', '.join(_ENTRY_KEYS)})")
    principal = entry.get("principal")
    if not isinstance(principal, str) or not _PRINCIPAL_RE.fullmatch(principal):
        raise _error(
            path,
            f"{shown}.principal",
            "expected 'user:NAME', 'uid:N', 'group:NAME' or 'gid:N' (no '*': map a group"
            f" to map many users), got {_describe(principal)}",
        )
    profile = entry.get("profile")
    if not isinstance(profile, str) or not _PROFILE_RE.fullmatch(profile):
        raise _error(
            path,
            f"{shown}.profile",
            f"expected a profile name, got {_describe(profile)}",
        )
    role_arn = entry.get("role_arn")
    if role_arn is not None and (
        not isinstance(role_arn, str) or not _ROLE_ARN_RE.fullmatch(role_arn)
    ):
        raise _error(
            path,
            f"{shown}.role_arn",
            f"expected an IAM role ARN, got {_describe(role_arn)}",
        )
    session = entry.get("role_session_name", "envfs")
    if not isinstance(session, str) or not _SESSION_RE.fullmatch(session):
        raise _error(
            path,
            f"{shown}.role_session_name",
            f"expected 2-64 letters, digits or +=,.@_-, got {_describe(session)}",
        )
    if "role_session_name" in entry and role_arn is None:
        raise _error(path, f"{shown}.role_session_name", "applies only with role_arn")
    return CredentialSource(index, principal, profile, role_arn, session)


def read_ca_bundle(
    path: Path | str, *, backing: Path | None = None, mountpoint: Path | None = None
) -> bytes:
    """The CA certificates (PEM) of an endpoint, read once from ``path`` under the same trust
    rules as the mapping (root's or yours, writable by no one else, not in ``backing`` or
    under ``mountpoint``):
    whoever could change them could stand in for the endpoint and read every data key.

    Raises:
        ConfigError: not an absolute path, not trusted, in the backing folder, or without a
            PEM certificate.
    """
    path = Path(path)
    if not path.is_absolute():
        raise ConfigError(f"CA bundle {str(path)!r}: expected an absolute path")
    _refuse_inside(path, backing, mountpoint)
    pem = check_trusted(path, secret=False)
    try:
        ssl.create_default_context(cadata=pem.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError, ValueError):
        raise ConfigError(f"{path}: not a bundle of PEM certificates") from None
    return pem


def _refuse_inside(path: Path | None, backing: Path | None, mountpoint: Path | None) -> None:
    """Whoever may write the backing store may forge files there, even root-owned ones (a
    removable disk, a network share): the mapping and its keys never come from it. Nor
    from under the mount point, which the mount would have to read through itself.

    Each folder on ``path``'s way is compared with those two by identity (device and
    inode), not only by name, so another path to the same folder (a bind mount of the
    backing folder, say) is refused too."""
    if path is None:
        return
    real = os.path.realpath(path)
    for folder, why in (
        (backing, "it is in the volume's backing folder {!r}, which whoever writes the"
         " backing store controls"),
        (mountpoint, "it is under the mount point {!r}, which the mount would have to read"
         " through itself"),
    ):  # fmt: skip
        if folder is None:
            continue
        inside = os.path.realpath(folder)
        within = os.path.commonpath([real, inside]) == inside
        if not within:
            with contextlib.suppress(OSError):  # a folder not made yet holds nothing
                wanted = _identity(inside)
                within = any(_identity(up) == wanted for up in _folders_above(real))
        if within:
            raise ConfigError(f"{path}: not trusted: " + why.format(str(folder)))


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _folders_above(path: str) -> list[str]:
    """The folders holding ``path`` (absolute, resolved), nearest first, up to ``/``."""
    folders = []
    while (parent := os.path.dirname(path)) != path:
        folders.append(parent)
        path = parent
    return folders


def check_trusted(path: Path, *, secret: bool) -> bytes:
    """Read ``path`` if it and its folder are trusted: owned by root or by the user running
    envfs, writable by no one else, a regular file reached without a symlink; a ``secret``
    one also readable by its owner only.

    Raises:
        ConfigError: otherwise (the message says which and why).
    """
    real_parent = _trusted_folder(path)
    me = os.geteuid()
    try:
        fd = os.open(
            real_parent / path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        )
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if st.st_uid not in (0, me) or st.st_mode & 0o022:
            raise ConfigError(
                f"{path}: not trusted: it must belong to root (or you) and be writable by no"
                f" one else (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
            )
        if secret and st.st_mode & 0o044:  # a group's members would be every mapped user
            raise ConfigError(
                f"{path}: holds secret keys but is readable by others than its owner (mode"
                f" {stat.S_IMODE(st.st_mode):04o}); chmod go-r it"
            )
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            if sum(map(len, chunks)) > 1 << 20:
                raise ConfigError(f"{path}: larger than 1 MiB")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _trusted_folder(path: Path) -> Path:
    """The folder of ``path``, resolved as the kernel resolves it, refusing unless every
    folder passed through belongs to root or to the user running envfs and is writable by
    no one else, or is sticky (as ``/tmp``: others may add entries but not move ours), and
    every symlink followed belongs to root or that user: anyone who could rename a folder on
    the way, or change a symlink, could put a mapping of their own in its place (a folder
    holding a symlink counts as on the way, though the symlink leads elsewhere).

    Raises:
        ConfigError: otherwise.
    """
    me = os.geteuid()
    here = Path("/")
    _check_folder(path, here, me)
    todo = list((path if path.is_absolute() else Path.cwd() / path).parent.parts[1:])
    links = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":  # ``here`` has no symlink in it: its parent is the lexical one
            here = here.parent
            continue
        step = here / part
        try:
            st = os.lstat(step)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 40:
                raise ConfigError(f"{path}: cannot read: too many levels of symbolic links")
            if st.st_uid not in (0, me):
                raise ConfigError(
                    f"{path}: not trusted: the symlink {str(step)!r} on its way must belong"
                    " to root (or you)"
                )
            target = Path(os.readlink(step))
            if target.is_absolute():
                here = Path("/")
                todo[:0] = target.parts[1:]
            else:
                todo[:0] = target.parts
            continue
        _check_folder(path, step, me)
        here = step
    return here


def _check_folder(path: Path, folder: Path, me: int) -> None:
    try:
        st = os.stat(folder)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    writable_by_others = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path}: cannot read: {str(folder)!r} is not a folder")
    if st.st_uid not in (0, me) or writable_by_others:
        raise ConfigError(
            f"{path}: not trusted: the folder {str(folder)!r} on its way must belong to"
            " root (or you) and be writable by no one else"
        )


def _read_ini(path: Path, *, secret: bool) -> dict[str, dict[str, str]]:
    """An AWS shared credentials or config file, as sections of ``key = value`` lines
    (AWS's own reading: ``#``/``;`` comments, no interpolation)."""
    import configparser

    parser = configparser.RawConfigParser()
    try:
        parser.read_string(check_trusted(path, secret=secret).decode(errors="replace"))
    except configparser.Error:
        raise ConfigError(f"{path}: not a valid AWS credentials or config file") from None
    sections = {name: dict(parser.items(name)) for name in parser.sections()}
    if not secret and any(_SECRET_KEYS & set(values) for values in sections.values()):
        # A config file holding keys is a credentials file (profiles are read from both):
        # read again, as one.
        return _read_ini(path, secret=True)
    return sections


def _error(path: Path, key: str, reason: str) -> ConfigError:
    return ConfigError(f"{path}: key {key!r}: {reason}")
