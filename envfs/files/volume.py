"""The volume file: what a backing folder is, authenticated by the key service.

``BACKING/.envfs-volume.json`` (hidden from the plaintext view) is a JSON object::

    {"envfs_volume": 1,                 # volume file version
     "volume_id": "<uuid>",
     "region": "<region>",
     "key_arn": "arn:envfs:kms:<region>:<account>:key/<uuid>",
     "previous_key_arns": [...],        # optional: see "Which keys" below
     "format_version": 2,               # file format of the volume's files (1 or 2)
     "block_shift": 14,                 # plaintext block size 2**14 = 16 KiB
     "features": ["names"],             # feature flags; unknown ones are refused
     "created": "<ISO 8601>",
     "auth_key": "<base64 ciphertext blob>",
     "mac": "<base64 HMAC-SHA256>"}

``auth_key`` is a data key generated under the volume's master key with the encryption
context ``{"envfs:volume": <volume id>, "envfs:purpose": "volume"}``; ``mac`` is an
HMAC-SHA256, under a key derived from it, of the canonical JSON of every other field.
Verifying asks the key service to decrypt ``auth_key`` *requiring* the key named in the
file (``KeyId``), so a volume file whose key or region was swapped, or any edited field,
is refused. Files of the volume use the context
``{"envfs:volume": <volume id>, "envfs:file": <file id, 32 lowercase hex digits>}``, so a
file header moved into another volume does not unwrap.

Which keys: the volume file, not a file's header, decides under which master keys the
volume's files may be wrapped. New files use ``key_arn``; ``previous_key_arns`` (present only
while the volume's key is being changed, see :meth:`Volume.begin_key_change`) lists further
keys whose files are still accepted. A header naming any other key is refused without asking
the key service (:meth:`Volume.accepts_key`): otherwise whoever may write the backing folder
and use some other key could plant a file whose data key they know.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import json
import os
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envfs import crypto
from envfs.arn import parse_arn
from envfs.errors import (
    IncorrectKeyException,
    InvalidArnException,
    InvalidCiphertextException,
    NotFoundException,
    VolumeError,
)
from envfs.files import fileformat, names
from envfs.identity import Caller
from envfs.keys.provider import EncryptionContext, KeyProvider

VOLUME_FILE = ".envfs-volume.json"
VOLUME_FILE_VERSION = 1
NAMES_FEATURE = "names"  # names, symlink targets and user. xattrs encrypted (version 2)
KNOWN_FEATURES: frozenset[str] = frozenset({NAMES_FEATURE})
FORMAT_VERSIONS = (1, 2)  # the file formats this envfs reads and writes
NEW_FORMAT_VERSION = 2  # what ``envfs init`` makes
_MAC_INFO = b"envfs volume mac v1"
_OPTIONAL_FIELDS = {"previous_key_arns"}
_FIELDS = {
    "envfs_volume",
    "volume_id",
    "region",
    "key_arn",
    "format_version",
    "block_shift",
    "features",
    "created",
    "auth_key",
    "mac",
}


@dataclass
class Volume:
    """A backing folder's volume settings."""

    backing: Path
    volume_id: str
    region: str
    key_arn: str
    block_shift: int = fileformat.DEFAULT_BLOCK_SHIFT
    format_version: int = fileformat.FORMAT_VERSION
    features: list[str] = field(default_factory=list)
    created: str = ""
    auth_key: bytes = b""
    mac: bytes = b""
    previous_key_arns: list[str] = field(default_factory=list)

    @property
    def block_size(self) -> int:
        return 1 << self.block_shift

    @property
    def encrypted_names(self) -> bool:
        """Whether names, symlink targets and ``user.`` xattrs are encrypted."""
        return NAMES_FEATURE in self.features

    def accepts_key(self, key_arn: str) -> bool:
        """Whether a file of this volume may be wrapped under ``key_arn`` (exact ARN)."""
        return key_arn == self.key_arn or key_arn in self.previous_key_arns

    def file_context(self, file_id: bytes) -> EncryptionContext:
        """The encryption context of one file's data key."""
        return {"envfs:volume": self.volume_id, "envfs:file": file_id.hex()}

    def _auth_context(self) -> EncryptionContext:
        return {"envfs:volume": self.volume_id, "envfs:purpose": "volume"}

    def _signed_fields(self) -> dict[str, Any]:
        optional: dict[str, Any] = {}
        if self.previous_key_arns:  # absent from older files, whose MAC must still verify
            optional["previous_key_arns"] = list(self.previous_key_arns)
        return optional | {
            "envfs_volume": VOLUME_FILE_VERSION,
            "volume_id": self.volume_id,
            "region": self.region,
            "key_arn": self.key_arn,
            "format_version": self.format_version,
            "block_shift": self.block_shift,
            "features": self.features,
            "created": self.created,
            "auth_key": base64.b64encode(self.auth_key).decode(),
        }

    def _mac_for(self, auth_plaintext: bytes) -> bytes:
        body = json.dumps(self._signed_fields(), sort_keys=True, separators=(",", ":"))
        return crypto.hmac_sha256(crypto.hkdf(auth_plaintext, _MAC_INFO), body.encode())

    # --- creating ----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        backing: Path,
        key_id: str,
        provider: KeyProvider,
        caller: Caller,
        *,
        block_shift: int = fileformat.DEFAULT_BLOCK_SHIFT,
        format_version: int = NEW_FORMAT_VERSION,
        encrypted_names: bool = True,
    ) -> Volume:
        """Make ``backing`` a new volume under the master key ``key_id``, with encrypted
        names unless ``encrypted_names`` is false (names need format version 2).

        Raises:
            VolumeError: ``backing`` is not an empty directory (or already a volume).
            KMSError: the key service refused (unknown key, not a key user, ...).
        """
        backing = Path(backing)
        if not fileformat.MIN_BLOCK_SHIFT <= block_shift <= fileformat.MAX_BLOCK_SHIFT:
            raise VolumeError(
                f"block size {1 << block_shift} is not allowed: expected a power of two from"
                f" {1 << fileformat.MIN_BLOCK_SHIFT} to {1 << fileformat.MAX_BLOCK_SHIFT} bytes"
            )
        if format_version not in FORMAT_VERSIONS:
            raise VolumeError(
                f"file format {format_version} is not one this envfs writes"
                f" ({', '.join(map(str, FORMAT_VERSIONS))})"
            )
        if encrypted_names and format_version < 2:
            raise VolumeError("encrypted names need file format version 2")
        if backing.exists() and not backing.is_dir():
            raise VolumeError(f"{str(backing)!r} is not a directory")
        if (backing / VOLUME_FILE).exists():
            raise VolumeError(f"{str(backing)!r} is already an envfs volume")
        if backing.exists() and any(backing.iterdir()):
            raise VolumeError(
                f"{str(backing)!r} is not empty: a volume starts from an empty folder, so that"
                " no plaintext file is ever mixed with encrypted ones"
            )
        volume = cls(
            backing=backing,
            volume_id=str(uuid.uuid4()),
            region=provider.region,
            key_arn="",
            block_shift=block_shift,
            format_version=format_version,
            features=[NAMES_FEATURE] if encrypted_names else [],
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        data_key = provider.generate_data_key(
            key_id, volume._auth_context(), caller, f"envfs init {backing}"
        )
        volume.key_arn = data_key.key_arn
        volume.auth_key = data_key.wrapped
        volume.mac = volume._mac_for(data_key.plaintext)
        # Only now: a refused key leaves no new folder behind.
        backing.mkdir(mode=0o700, parents=True, exist_ok=True)
        if encrypted_names:  # the root's directory id, before the volume file says "names"
            keys = names.NameKeys.derive(data_key.plaintext, volume.volume_id)
            dir_file = names.encode_dir_file(keys, names.new_dir_id(), volume.volume_id)
            fd = os.open(
                backing / os.fsdecode(names.DIR_FILE),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o440,
            )
            try:
                os.write(fd, dir_file)
                os.fsync(fd)
            finally:
                os.close(fd)
        volume._write()
        return volume

    def _write(self) -> None:
        """Replace the volume file atomically (temporary file, fsync, rename, fsync folder).

        The backing folder may hold a planted ``.envfs-volume.json.tmp`` (a symlink to a
        file of root's, say): it is removed, never followed or truncated.
        """
        doc = {**self._signed_fields(), "mac": base64.b64encode(self.mac).decode()}
        tmp = VOLUME_FILE + ".tmp"
        dir_fd = os.open(self.backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o644, dir_fd=dir_fd)
            try:
                os.write(fd, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, VOLUME_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def begin_key_change(self, new_key_id: str, provider: KeyProvider, caller: Caller) -> None:
        """Make ``new_key_id`` the key of new files, keeping the files under the current
        key(s) valid: the groundwork of a key change, which a rewrap of every header then
        completes. The volume file is authenticated anew under the new key.

        Raises:
            KMSError: the key service refused (unknown key, not a key user...).
            VolumeError: the new key is in another region, or the volume's names are
                encrypted (they are derived from the volume's secret, which a new data key
                would change: that takes a ReEncrypt of the secret, ``envfs rewrap``'s job).
        """
        if self.encrypted_names:
            raise VolumeError(
                "the key of a volume with encrypted names cannot be changed this way: its"
                " names are derived from the volume's secret, which must be re-encrypted"
                " under the new key, not replaced"
            )
        data_key = provider.generate_data_key(
            new_key_id, self._auth_context(), caller, f"envfs key change {self.backing}"
        )
        if parse_arn(data_key.key_arn).region != self.region:
            raise VolumeError(f"key {data_key.key_arn!r} is not in region {self.region!r}")
        if data_key.key_arn != self.key_arn:
            previous = [self.key_arn, *self.previous_key_arns]
            self.previous_key_arns = [a for a in dict.fromkeys(previous) if a != data_key.key_arn]
        self.key_arn = data_key.key_arn
        self.auth_key = data_key.wrapped
        self.mac = self._mac_for(data_key.plaintext)
        self._write()

    # --- loading and verifying ---------------------------------------------------------

    @classmethod
    def load(cls, backing: Path) -> Volume:
        """Read and check the structure of ``backing``'s volume file (nothing verified yet).

        Raises:
            VolumeError: no volume file, or one that is malformed or of an unknown version.
        """
        backing = Path(backing)
        path = backing / VOLUME_FILE
        if not backing.is_dir():
            raise VolumeError(f"{str(backing)!r} is not a directory")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise VolumeError(f"{str(path)!r} is not a regular file")
                with os.fdopen(os.dup(fd), "rb") as f:
                    raw = f.read(1 << 20)
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise VolumeError(
                f"{str(backing)!r} is not an envfs volume (no {VOLUME_FILE}; create one with"
                " 'envfs init')"
            ) from None
        except OSError as exc:
            raise VolumeError(f"cannot read {str(path)!r}: {exc.strerror}") from None
        try:
            doc = json.loads(raw)
        except ValueError:
            raise VolumeError(f"{str(path)!r} is not valid JSON") from None
        if not isinstance(doc, dict):
            raise VolumeError(f"{str(path)!r} is not a JSON object")
        version = doc.get("envfs_volume")
        if version != VOLUME_FILE_VERSION:
            raise VolumeError(
                f"{str(path)!r} has volume file version {version!r}; this envfs reads"
                f" version {VOLUME_FILE_VERSION}"
            )
        unknown = set(doc) - _FIELDS - _OPTIONAL_FIELDS
        missing = _FIELDS - set(doc)
        if unknown or missing:
            raise VolumeError(
                f"{str(path)!r} is malformed: unknown fields {sorted(unknown)},"
                f" missing fields {sorted(missing)}"
            )
        try:
            volume = cls(
                backing=backing,
                volume_id=_typed(doc, "volume_id", str),
                region=_typed(doc, "region", str),
                key_arn=_typed(doc, "key_arn", str),
                block_shift=_typed(doc, "block_shift", int),
                format_version=_typed(doc, "format_version", int),
                features=_typed(doc, "features", list),
                created=_typed(doc, "created", str),
                auth_key=base64.b64decode(_typed(doc, "auth_key", str), validate=True),
                mac=base64.b64decode(_typed(doc, "mac", str), validate=True),
                previous_key_arns=_typed(doc, "previous_key_arns", list, default=[]),
            )
        except (binascii.Error, ValueError) as exc:
            raise VolumeError(f"{str(path)!r} is malformed: {exc}") from None
        if volume.format_version not in FORMAT_VERSIONS:
            raise VolumeError(
                f"{str(path)!r} uses file format {volume.format_version}; this envfs reads"
                f" formats {' and '.join(map(str, FORMAT_VERSIONS))}"
            )
        unknown_features = set(map(str, volume.features)) - KNOWN_FEATURES
        if unknown_features:
            raise VolumeError(
                f"{str(path)!r} needs features this envfs does not have: {sorted(unknown_features)}"
            )
        if volume.encrypted_names and volume.format_version < 2:
            raise VolumeError(f"{str(path)!r} is malformed: names need file format 2")
        if len(set(map(str, volume.features))) != len(volume.features):
            raise VolumeError(f"{str(path)!r} is malformed: a feature is named twice")
        if not fileformat.MIN_BLOCK_SHIFT <= volume.block_shift <= fileformat.MAX_BLOCK_SHIFT:
            raise VolumeError(f"{str(path)!r} has an invalid block shift {volume.block_shift}")
        if not all(isinstance(a, str) for a in volume.previous_key_arns) or (
            "previous_key_arns" in doc and not volume.previous_key_arns
        ):
            raise VolumeError(f"{str(path)!r} is malformed: bad previous_key_arns")
        try:
            key_region = parse_arn(volume.key_arn).region
            previous_regions = {parse_arn(a).region for a in volume.previous_key_arns}
        except InvalidArnException:
            raise VolumeError(f"{str(path)!r} names a key that is not a key ARN") from None
        if previous_regions - {volume.region}:
            raise VolumeError(
                f"{str(path)!r} is not consistent: it accepts keys of regions"
                f" {sorted(previous_regions - {volume.region})} in region {volume.region!r}"
            )
        if key_region != volume.region:
            # Caught here, before a key store of the wrong region is even looked for.
            raise VolumeError(
                f"{str(path)!r} is not consistent: its region is {volume.region!r} but its key"
                f" {volume.key_arn!r} is in region {key_region!r}"
            )
        return volume

    def require_key(self, key_arn: str) -> None:
        """Refuse a volume file naming another key than ``key_arn`` (the mount's
        ``--key-arn``). A volume file is authenticated by the key it names, so whoever may
        write the backing folder and use *some* key (one of their own in AWS KMS, say)
        can put a whole new volume file in its place; only a key fixed outside the backing
        folder tells the two apart.

        Raises:
            VolumeError: the volume file names another key.
        """
        if self.key_arn != key_arn:
            raise VolumeError(
                f"the volume file of {str(self.backing)!r} names key {self.key_arn!r}, not"
                f" {key_arn!r} (--key-arn): refused, it may have been replaced"
            )

    def check_region(self, provider: KeyProvider) -> None:
        """Refuse a volume of another region than the key service's (no call needed).

        Raises:
            VolumeError: the volume file names another region, or a key of another region.
        """
        try:
            key_region = parse_arn(self.key_arn).region
        except Exception:
            raise VolumeError(f"volume key {self.key_arn!r} is not a key ARN") from None
        if self.region != provider.region or key_region != provider.region:
            raise VolumeError(
                f"volume {self.volume_id} belongs to region {self.region!r} (key"
                f" {self.key_arn!r}); the key service serves region {provider.region!r}"
            )
        # The authentication key's blob names the key it is under: a volume file whose key
        # ARN was swapped is refused here, before any key-service call or permission.
        # (A service whose blobs are opaque, AWS KMS, is left to Decrypt requiring the key.)
        blob = provider.read_wrapped(self.auth_key)
        if provider.reads_wrapped and (
            blob is None or not self.key_arn.endswith(f":key/{blob.key_id}")
        ):
            raise VolumeError(
                f"the volume file of {str(self.backing)!r} is not authentic: it names key"
                f" {self.key_arn!r} but was made under another key"
            )

    def verify(self, provider: KeyProvider, caller: Caller) -> bytes:
        """Authenticate the volume file with the key service, as ``caller``; returns the
        volume's secret (the unwrapped ``auth_key``), from which its name keys come.

        Raises:
            VolumeError: the file was altered, or its key or region swapped.
            NotFoundException: the key named in the file does not exist (deleted, or an
                edited file naming a key that never existed).
            KMSError: the key service refused ``caller`` (e.g. AccessDeniedException,
                DisabledException).
        """
        self.check_region(provider)
        try:
            auth = provider.decrypt(
                self.auth_key,
                self.key_arn,
                self._auth_context(),
                caller,
                f"envfs mount {self.backing}",
            )
        except NotFoundException as exc:
            # Said as the key service says it (exit code 11): the key may have been deleted,
            # or the file edited to name a key that never existed.
            raise NotFoundException(
                f"volume {str(self.backing)!r} cannot be used: {exc.message}"
            ) from None
        except (IncorrectKeyException, InvalidCiphertextException) as exc:
            raise VolumeError(
                f"the volume file of {str(self.backing)!r} is not authentic: {exc.message}"
            ) from None
        if not crypto.constant_time_equal(self._mac_for(auth), self.mac):
            raise VolumeError(
                f"the volume file of {str(self.backing)!r} is not authentic: it was altered"
            )
        return auth


_MISSING = object()


def _typed(doc: dict[str, Any], name: str, kind: type, default: Any = _MISSING) -> Any:
    if default is not _MISSING and name not in doc:
        return default
    value = doc[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"field {name!r} must be of type {kind.__name__}")
    return value
