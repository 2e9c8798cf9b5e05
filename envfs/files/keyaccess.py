"""The key path of a volume's files: every decision about who may use a file's data key.

Every ``open`` and ``create`` is an access decision for the calling user, made by the key
service (Decrypt or GenerateDataKey on the user's behalf, audited with the backing path):
the page cache is shared between users, so the open is the only gate. So is every content
change that does not go through a handle the user opened (truncate, fallocate). Before the
first decision the volume file itself is authenticated by the key service.

Only the volume file decides which master keys may wrap a file's data key
(:meth:`Volume.accepts_key`), and the format version of its files; a header naming any other
key, or of another version, is refused (EIO) without asking the key service.

:class:`KeyAccess` is that path on its own, so that the mount's namespace operations
(:mod:`.vfs`) and tools working on a backing folder without a mount share it. The users
behind requests, with their groups, are kept exactly as long as a key decision may be
reused (:mod:`.callers`); recent decisions per user are in :mod:`.keycache`, data keys
made in advance in :mod:`.keypool`.
"""

from __future__ import annotations

import errno
import logging
import os

from envfs import crypto
from envfs.errors import IntegrityError, KMSError, VolumeError
from envfs.files import fileformat
from envfs.files.callers import CallerCache
from envfs.files.fileformat import FileHeader
from envfs.files.keycache import DataKeyCache
from envfs.files.keypool import DataKeyPool
from envfs.files.names import NameKeys
from envfs.files.volume import Volume
from envfs.identity import Caller
from envfs.keys.provider import DataKey, KeyProvider

log = logging.getLogger(__name__)


class KeyAccess:
    """Data keys of one volume's files, decided per user.

    Args:
        volume: the loaded volume (its file is verified at the first decision).
        provider: the key service, called on behalf of each user.
        key_cache: recent key decisions per user (default: none, every open asks); the
            users' groups are kept exactly as long.
        key_pool: data keys made in advance per user, if any.
    """

    def __init__(
        self,
        volume: Volume,
        provider: KeyProvider,
        *,
        key_cache: DataKeyCache | None = None,
        key_pool: DataKeyPool | None = None,
    ) -> None:
        self.volume = volume
        self.provider = provider
        self.key_cache = key_cache if key_cache is not None else DataKeyCache(0)
        self.key_pool = key_pool
        self.callers = CallerCache(self.key_cache.max_age)
        self.volume_verified = False
        self.name_keys: NameKeys | None = None  # with the volume's authentication

    def caller(self, uid: int, gid: int) -> Caller:
        """The identity of a request's user, with its groups (see :mod:`.callers`)."""
        return self.callers.get(uid, gid)

    def verify_volume(self, caller: Caller) -> None:
        """Authenticate the volume file as ``caller`` unless already done; a volume with
        encrypted names then has its name keys (:attr:`name_keys`).

        Raises:
            VolumeError: the volume file is not authentic.
            KMSError: the key service refused ``caller``.
        """
        if not self.volume_verified:
            secret = self.volume.verify(self.provider, caller)
            if self.volume.encrypted_names:
                self.name_keys = NameKeys.derive(secret, self.volume.volume_id)
            self.volume_verified = True
            log.info("volume %s authenticated by the key service", self.volume.volume_id)

    def decide(self, caller: Caller) -> None:
        """The volume must be authentic before any file is opened or created."""
        try:
            self.verify_volume(caller)
        except VolumeError as exc:
            log.error("%s", exc.message)
            raise

    def new_data_key(self, caller: Caller, path: bytes) -> tuple[bytes, DataKey]:
        """A file id and a data key for a new file ``caller`` creates at ``path``: one made
        in advance for the same user, or a GenerateDataKey decision now."""
        pooled = self.key_pool.take(caller) if self.key_pool is not None else None
        if pooled is not None:
            file_id, data_key = pooled
        else:
            file_id = crypto.random_bytes(fileformat.FILE_ID_SIZE)
            data_key = self.provider.generate_data_key(
                self.volume.key_arn, self.volume.file_context(file_id), caller, os.fsdecode(path)
            )
        self.key_cache.put(caller.uid, caller.gid, file_id, data_key.wrapped, data_key.plaintext)
        return file_id, data_key

    def unwrap(self, header: FileHeader, caller: Caller, path: bytes, purpose: str = "") -> bytes:
        """The file's data key for ``caller``: the key service's decision, or a recent one
        for the same user from the cache (see :mod:`.keycache`).

        Raises:
            IntegrityError: the header is of another format version than the volume's files
                or names a key the volume does not accept (nothing is asked of the key
                service), or its data key does not unwrap.
        """
        if header.version != self.volume.format_version:
            # A version 1 header planted in a version 2 volume (or the reverse) would be read
            # by the other version's rules: the volume file, not the header, decides.
            log.warning(
                "backing file %r: its header is format version %d, the volume's files are"
                " version %d",
                path,
                header.version,
                self.volume.format_version,
            )
            raise IntegrityError("the header's format version is not the volume's")
        if not self.volume.accepts_key(header.key_arn):
            log.warning(
                "backing file %r: its header names key %r, which the volume does not accept",
                path,
                header.key_arn,
            )
            raise IntegrityError("the header names a key the volume does not accept")
        wrapped, file_id = header.wrapped_key, header.file_id
        cached = self.key_cache.get(caller.uid, caller.gid, file_id, wrapped)
        if cached is not None:
            return cached
        note = os.fsdecode(path) + (f" ({purpose})" if purpose else "")
        try:
            data_key = self.provider.decrypt(
                wrapped, header.key_arn, self.volume.file_context(file_id), caller, note
            )
        except KMSError as exc:
            if exc.errno == errno.EIO:
                log.warning("backing file %r: its data key does not unwrap: %s", path, exc)
            raise
        self.key_cache.put(caller.uid, caller.gid, file_id, wrapped, data_key)
        return data_key

    def close(self) -> None:
        """Forget every data key and caller (at unmount)."""
        self.key_cache.clear()
        if self.key_pool is not None:
            self.key_pool.clear()
        self.callers.close()
