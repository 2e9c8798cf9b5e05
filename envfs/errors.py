"""One exception tree for envfs.

Every class knows the errno the filesystem answers with, the exit code the CLI ends
with, and (for key-service errors) the AWS error name sent over the wire and printed
by the CLI. The exit codes are a documented list (``docs/kms.md``); never renumber one.
"""

from __future__ import annotations

import errno as _errno
from typing import ClassVar


class EnvfsError(Exception):
    """Base of every error envfs raises on purpose."""

    errno: ClassVar[int] = _errno.EIO
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(EnvfsError):
    """A bad command-line argument."""

    errno = _errno.EINVAL
    exit_code = 2


# --- key service errors (AWS KMS names) -------------------------------------------------


class KMSError(EnvfsError):
    """An error of the key service; ``aws_name`` is the AWS error code."""

    aws_name: ClassVar[str] = "KMSInternalException"
    exit_code = 10
    registry: ClassVar[dict[str, type[KMSError]]] = {}

    def __init_subclass__(cls, *, wire: bool = True, **kwargs: object) -> None:
        # ``wire=False``: a class that must not become what ``from_wire`` rebuilds for its
        # name (the HTTP client's classes for names envfs does not know, or an error that
        # shares its parent's name but not its meaning).
        super().__init_subclass__(**kwargs)
        if wire:
            KMSError.registry[cls.aws_name] = cls

    @classmethod
    def from_wire(cls, aws_name: str, message: str) -> KMSError:
        """Rebuild the error a key-service daemon answered with."""
        err_cls = cls.registry.get(aws_name, KMSInternalException)
        return err_cls(message)


class KMSInternalException(KMSError):
    aws_name = "KMSInternalException"
    exit_code = 10


class NotFoundException(KMSError):
    aws_name = "NotFoundException"
    errno = _errno.ENOKEY
    exit_code = 11


class AccessDeniedException(KMSError):
    aws_name = "AccessDeniedException"
    errno = _errno.EACCES
    exit_code = 12


class DisabledException(KMSError):
    aws_name = "DisabledException"
    errno = _errno.EKEYREVOKED
    exit_code = 13


class KMSInvalidStateException(KMSError):
    aws_name = "KMSInvalidStateException"
    errno = _errno.EKEYREVOKED
    exit_code = 14


class InvalidCiphertextException(KMSError):
    aws_name = "InvalidCiphertextException"
    errno = _errno.EIO
    exit_code = 15


class IncorrectKeyException(KMSError):
    aws_name = "IncorrectKeyException"
    errno = _errno.EIO
    exit_code = 16


class MalformedPolicyDocumentException(KMSError):
    aws_name = "MalformedPolicyDocumentException"
    errno = _errno.EINVAL
    exit_code = 17


class ValidationException(KMSError):
    aws_name = "ValidationException"
    errno = _errno.EINVAL
    exit_code = 18


class AlreadyExistsException(KMSError):
    aws_name = "AlreadyExistsException"
    errno = _errno.EEXIST
    exit_code = 19


class InvalidAliasNameException(KMSError):
    aws_name = "InvalidAliasNameException"
    errno = _errno.EINVAL
    exit_code = 20


class TagException(KMSError):
    aws_name = "TagException"
    errno = _errno.EINVAL
    exit_code = 21


class LimitExceededException(KMSError):
    aws_name = "LimitExceededException"
    errno = _errno.EDQUOT
    exit_code = 22


class InvalidMarkerException(KMSError):
    aws_name = "InvalidMarkerException"
    errno = _errno.EINVAL
    exit_code = 23


class InvalidArnException(KMSError):
    aws_name = "InvalidArnException"
    errno = _errno.EINVAL
    exit_code = 24


class UnsupportedOperationException(KMSError):
    aws_name = "UnsupportedOperationException"
    errno = _errno.EOPNOTSUPP
    exit_code = 25


class DependencyTimeoutException(KMSError):
    """The key service did not answer in time."""

    aws_name = "DependencyTimeoutException"
    errno = _errno.ETIMEDOUT
    exit_code = 26


class KMSUnavailableException(KMSError):
    """The key-service daemon cannot be reached (no socket, refused, connection lost)."""

    aws_name = "KMSUnavailableException"
    errno = _errno.EHOSTDOWN
    exit_code = 27


class InvalidRequestException(KMSError):
    """A request that is not a well-formed call (unknown operation, bad frame)."""

    aws_name = "InvalidRequestException"
    errno = _errno.EINVAL
    exit_code = 28


class ThrottlingException(KMSError):
    """The caller's uid exceeded one of the daemon's rate limits; nothing was done.

    Safe to retry later (with backoff): the request was refused before it was run.
    """

    aws_name = "ThrottlingException"
    errno = _errno.EAGAIN
    exit_code = 29


# --- key store ---------------------------------------------------------------------------


class StoreError(EnvfsError):
    """The key store cannot be used as it is."""

    exit_code = 30


class StorePermissionError(StoreError):
    """A store file or directory is open to group or others, or owned by someone else."""

    errno = _errno.EPERM
    exit_code = 31


class StoreNotFoundError(StoreError):
    """No store was initialised for this region at this location."""

    errno = _errno.ENOENT
    exit_code = 32


class RootKeyError(StoreError):
    """The root key is missing, malformed or not the store's."""

    errno = _errno.EACCES
    exit_code = 33


class StoreCorruptError(StoreError):
    """The store's contents fail their integrity checks."""

    exit_code = 34


class AuditLogDamagedError(StoreCorruptError):
    """The audit log cannot take a record (its head is missing or altered, or rows sit
    after it): no call can be audited, so none is served until it is repaired."""

    exit_code = 35


class AuditVerificationError(EnvfsError):
    """The audit log's hash chain does not verify: a record was altered or removed."""

    exit_code = 40


# --- integrity of encrypted data ----------------------------------------------------------


class IntegrityError(EnvfsError):
    """Authenticated data failed to verify. Deliberately says nothing about which check."""

    errno = _errno.EIO
    exit_code = 50


# --- volumes and mounts -------------------------------------------------------------------


class VolumeError(EnvfsError):
    """A backing folder that is not a usable envfs volume (missing, malformed, unauthentic)."""

    errno = _errno.EIO
    exit_code = 60


class MountError(EnvfsError):
    """The mount cannot be made or unmade (mount point missing or busy, FUSE failure)."""

    errno = _errno.EBUSY
    exit_code = 61


class ConfigError(EnvfsError):
    """A volume configuration file that is missing, unreadable or has a bad key or value."""

    errno = _errno.EINVAL
    exit_code = 62
