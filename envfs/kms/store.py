"""The key store of one region: SQLite in WAL mode, key material sealed under a root key.

Layout of a store directory (mode 0700, owned by the service's user)::

    <kms dir>/<region>/keys.db     SQLite database (and its -wal/-shm files), mode 0600
    <kms dir>/<region>/root.key    the root key, base64 text, mode 0600 (absent for
                                   passphrase stores and when a systemd credential is used;
                                   see kms.rootkey)
    <kms dir>/<region>/audit-journal-<hex>.log
                                   batched audit records of a running mount (kms.journal)

The root key never touches the database. Sub-keys derived from it with HKDF seal key
material (AES-256-GCM, AAD = region, key id and version, so sealed material cannot be
moved between keys, versions or regions), key the audit log's MAC chain, and check that
the right root key was given.

Every change is one ``BEGIN IMMEDIATE`` transaction committed with ``synchronous=FULL``:
once a call returns, its change survives a crash, and a crash never leaves half a key.
The audit log's archiving and repair are such transactions too, with the archive file
written and fsynced inside them, before the commit (``docs/kms.md`` §8.2, §8.3).

Access keys (``docs/kms.md`` §7.1) live in the store too: each secret is sealed like key
material, under its own HKDF sub-key, with AAD = region and access key id.

Schema versions: 1 (the first), 2 (the audit checkpoint), 3 (access keys). An older store
is upgraded to 3 when opened (:meth:`KeyStore._upgrade`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envfs import crypto
from envfs.arn import validate_region
from envfs.errors import (
    AuditLogDamagedError,
    IntegrityError,
    RootKeyError,
    StoreCorruptError,
    StoreError,
    StoreNotFoundError,
)
from envfs.kms import rootkey
from envfs.kms.archive import fsync_dir
from envfs.kms.audit import (
    ZERO_MAC,
    AuditLog,
    DamagedChain,
    EncodedRecord,
    Problem,
    Verification,
)
from envfs.kms.auditbatch import AuditBatching
from envfs.kms.model import DEFAULT_KEY_CREATORS_GROUP, AccessKeyStatus, KeyState
from envfs.kms.paths import check_private
from envfs.kms.retention import AuditRetention

logger = logging.getLogger(__name__)

# 2: the audit checkpoint (meta "audit_checkpoint"), so that archived records can leave
# the log. 3: the access_keys table. Older stores are upgraded when opened
# (KeyStore._upgrade).
SCHEMA_VERSION = 3
DB_NAME = "keys.db"

# Added by schema 3 (also part of a new store's schema).
_ACCESS_KEYS_SCHEMA = """
CREATE TABLE access_keys (
    access_key_id TEXT PRIMARY KEY,
    uid INTEGER NOT NULL,
    user_name TEXT,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL,
    secret BLOB NOT NULL
);
CREATE INDEX access_keys_by_uid ON access_keys(uid);
"""

_SCHEMA = (
    """
CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE keys (
    key_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    description TEXT NOT NULL,
    state TEXT NOT NULL,
    deletion_date REAL,
    pending_window_days INTEGER,
    rotation_period_days INTEGER,
    next_rotation REAL,
    policy TEXT NOT NULL
);
CREATE TABLE key_versions (
    key_id TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    created REAL NOT NULL,
    rotation_type TEXT,
    material BLOB NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE aliases (
    name TEXT PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX aliases_by_key ON aliases(key_id);
CREATE TABLE tags (
    key_id TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    tag_key TEXT NOT NULL,
    tag_value TEXT NOT NULL,
    PRIMARY KEY (key_id, tag_key)
);
CREATE TABLE audit (seq INTEGER PRIMARY KEY, record TEXT NOT NULL, mac BLOB NOT NULL);
"""
    + _ACCESS_KEYS_SCHEMA
)


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@dataclass
class KeyRecord:
    """A master key's row (its versions live in ``key_versions``)."""

    key_id: str
    created: float
    description: str
    state: KeyState
    deletion_date: float | None
    pending_window_days: int | None
    rotation_period_days: int | None  # None: automatic rotation is off
    next_rotation: float | None
    policy: str


@dataclass(frozen=True)
class AccessKeyRecord:
    """An access key's row, without its secret (which only :meth:`KeyStore.access_key_secret`
    opens)."""

    access_key_id: str
    uid: int
    user_name: str | None  # the user's name when the key was created, for display
    status: AccessKeyStatus
    created: float
    last_used: float | None


@dataclass(frozen=True)
class KeyVersion:
    version: int
    created: float
    rotation_type: str | None  # None for the first version; "AUTOMATIC" or "ON_DEMAND"


_MISS = object()
_READ_CACHE_SIZE = 4096


class KeyStore(AuditBatching, AuditRetention):
    """One region's key store. Use :meth:`init` or :meth:`open`; not thread-safe.

    Batched audit records and journal recovery come from :class:`AuditBatching`, the
    audit log's archiving and repair from :class:`AuditRetention`."""

    def __init__(self, directory: Path, conn: sqlite3.Connection, root_key: bytes) -> None:
        self.directory = directory
        self._conn = conn
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        try:
            schema = meta["schema"]
            if not isinstance(schema, int) or not 1 <= schema <= SCHEMA_VERSION:
                raise StoreError(
                    f"key store {str(directory)!r} has schema version {schema!r},"
                    f" this envfs reads versions 1 to {SCHEMA_VERSION}"
                )
            self.schema: int = schema
            self.region: str = str(meta["region"])
            self.account: str = str(meta["account"])
            self.key_creators_group: str = str(meta["key_creators_group"])
            root_check = bytes(meta["root_check"])
        except KeyError as exc:
            raise StoreCorruptError(f"key store {str(directory)!r} lacks {exc}") from None
        # Rows read inside transactions, reused until something may have changed them:
        # a write or rollback on this connection, or a commit by any other connection
        # (``PRAGMA data_version``, checked when each transaction begins).
        self._reads: dict[tuple[str, str], Any] = {}
        self._data_version = -1
        self._reading = False  # inside reading(): rows may be reused as in a transaction
        self._init_audit_batch()
        # Set by audit_verification() in a transaction that found the log damaged: that
        # call (VerifyAudit) told its caller, so its own record may be left out.
        self._damage_reported = False
        self._material = crypto.Aead(crypto.hkdf(root_key, b"envfs-kms v1 material seal"))
        self._access_secret = crypto.Aead(
            crypto.hkdf(root_key, b"envfs-kms v1 access key secret seal")
        )
        self._audit_key = crypto.hkdf(root_key, b"envfs-kms v1 audit chain")
        self.audit = AuditLog(conn, self._audit_key)
        self._journal_key = crypto.hkdf(root_key, b"envfs-kms v1 audit journal")
        check = crypto.Aead(crypto.hkdf(root_key, b"envfs-kms v1 root check"))
        try:
            check.open(root_check, self.region.encode())
        except IntegrityError:
            raise RootKeyError(
                f"the root key given does not open the key store {str(directory)!r}"
            ) from None

    # --- opening -----------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: Path,
        region: str,
        *,
        passphrase: bytes | None = None,
        key_creators_group: str = DEFAULT_KEY_CREATORS_GROUP,
    ) -> KeyStore:
        """Create a new, empty store for ``region`` in ``directory``.

        Without a passphrase a random root key is written to ``root.key`` (mode 0600).

        Raises:
            StoreError: a store (or a stray root key) is already there.
            StorePermissionError: the directory is open to group or others.
        """
        validate_region(region)
        directory = Path(directory)
        old_umask = os.umask(0o077)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        finally:
            os.umask(old_umask)
        check_private(directory, "key store directory")
        db_path = directory / DB_NAME
        key_path = directory / rootkey.ROOT_KEY_NAME
        if db_path.exists():
            raise StoreError(f"a key store already exists at {str(directory)!r}")
        if key_path.exists():
            raise StoreError(
                f"{str(key_path)!r} exists without a key store beside it; move it away if it is"
                " not needed (it may be the only copy of a root key)"
            )
        meta: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "region": region,
            "account": str(int.from_bytes(crypto.random_bytes(8), "big") % 10**12).zfill(12),
            "key_creators_group": key_creators_group,
        }
        root_key, root_meta = rootkey.new_root_key(passphrase)
        meta.update(root_meta)
        check = crypto.Aead(crypto.hkdf(root_key, b"envfs-kms v1 root check"))
        meta["root_check"] = check.seal(b"envfs-kms root key check", region.encode())

        tmp_db = directory / (DB_NAME + ".init")
        tmp_key = directory / (rootkey.ROOT_KEY_NAME + ".init")
        for leftover in (tmp_db, tmp_key):
            leftover.unlink(missing_ok=True)
        fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if passphrase is None:
                os.write(fd, rootkey.encode_root_key(root_key))
            os.fsync(fd)
        finally:
            os.close(fd)
        conn = _connect(tmp_db)
        with conn:
            conn.executescript(_SCHEMA)
            conn.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        store = cls(directory, _connect(tmp_db), root_key)
        with store.transaction():
            store.audit.write_head(0, ZERO_MAC)  # an empty log has a head too
            store.audit.write_checkpoint(0, ZERO_MAC)  # and a checkpoint: nothing archived
        store.close()
        for suffix in ("-wal", "-shm"):
            Path(str(tmp_db) + suffix).unlink(missing_ok=True)
        if passphrase is None:
            tmp_key.rename(key_path)
        else:
            tmp_key.unlink()
        tmp_db.rename(db_path)
        fsync_dir(directory)
        return cls.open(directory, region, passphrase=passphrase)

    @staticmethod
    def needs_passphrase(directory: Path) -> bool:
        """Whether the store in ``directory`` is protected by a passphrase (False: no store)."""
        if not (Path(directory) / DB_NAME).exists():
            return False
        return _read_meta(Path(directory) / DB_NAME, "root_kind") == b"passphrase"

    @classmethod
    def open(
        cls,
        directory: Path,
        region: str,
        *,
        passphrase: bytes | None = None,
        root_key_file: Path | None = None,
    ) -> KeyStore:
        """Open the store of ``region`` in ``directory``.

        The root key comes from, in order: ``root_key_file``; the systemd credential
        ``$CREDENTIALS_DIRECTORY/root-key``; ``passphrase`` (for a passphrase store);
        ``directory/root.key``.

        Raises:
            StoreNotFoundError, StorePermissionError, RootKeyError, StoreError.
        """
        validate_region(region)
        directory = Path(directory)
        db_path = directory / DB_NAME
        if not db_path.exists():
            raise StoreNotFoundError(
                f"no key store for region {region!r} at {str(directory)!r}"
                " (create one with 'envfs kms init')"
            )
        check_private(directory, "key store directory")
        for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", rootkey.ROOT_KEY_NAME):
            check_private(directory / name, "key store file")
        store_region = _read_meta(db_path, "region")
        if store_region is None or store_region.decode() != region:
            found = store_region.decode() if store_region else "none"
            raise StoreError(
                f"the key store at {str(directory)!r} serves region {found!r}, not {region!r}"
            )
        read_meta = functools.partial(_read_meta, db_path)
        root_key = rootkey.load_root_key(directory, read_meta, passphrase, root_key_file)
        conn = _connect(db_path)
        try:
            store = cls(directory, conn, root_key)
        except BaseException:
            conn.close()
            raise
        try:
            if store.schema < SCHEMA_VERSION:
                store._upgrade()
            store._recover_journals_if_possible()
        except BaseException:
            store.close()
            raise
        return store

    def _upgrade(self) -> None:
        """Bring a store of an older schema to :data:`SCHEMA_VERSION`, in one transaction.

        1 -> 2: the audit checkpoint, at record 0 (nothing archived yet).
        2 -> 3: the ``access_keys`` table, empty.
        """
        try:
            with self.transaction():
                # Read again under the write lock: another opener may have upgraded it.
                row = self._conn.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
                schema = row[0]
                if schema == 1:
                    self.audit.write_checkpoint(0, ZERO_MAC)
                    schema = 2
                if schema == 2:
                    # executescript() would commit the transaction: one statement at a time.
                    for statement in _ACCESS_KEYS_SCHEMA.split(";"):
                        if statement.strip():
                            self._conn.execute(statement)
                    schema = 3
                self._conn.execute("UPDATE meta SET value=? WHERE name='schema'", (schema,))
        except sqlite3.DatabaseError as exc:
            raise StoreCorruptError(
                f"key store {str(self.directory)!r} could not be upgraded to schema version"
                f" {SCHEMA_VERSION} (it is left as it was): {exc}"
            ) from None
        logger.info(
            "upgraded the key store %s to schema version %d", self.directory, SCHEMA_VERSION
        )
        self.schema = SCHEMA_VERSION

    def close(self) -> None:
        """Add the batched audit records to the chain and close. If they cannot be added,
        they stay in the journal for the next opener."""
        try:
            if self._journal is not None:
                self.flush_audit()
                self._retire_journal()
                self.flush_audit()  # its row
        finally:
            if self._journal is not None:
                self._journal.close()
            self._conn.close()

    # --- transactions ------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[None]:
        """One write transaction, committed on success and rolled back on error.

        Args:
            durable: commit with ``synchronous=FULL`` (survives power loss once returned).
                False commits with ``NORMAL``: it survives a crash of the process but the
                last commits may be lost on power loss. Only for transactions that add
                nothing but audit records of calls that changed no key.
        """
        # The connection's default is NORMAL, so the frequent calls (audit records of
        # Decrypt, GenerateDataKey...) pay for no pragma; changes switch to FULL.
        if durable:
            self._conn.execute("PRAGMA synchronous=FULL")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                # With the write lock held, nobody else can commit until we are done.
                self._damage_reported = False
                self._check_data_version()
                added = self._add_batch()
                yield
            except BaseException:
                self._forget_reads()
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        finally:
            if durable:
                self._conn.execute("PRAGMA synchronous=NORMAL")
        if added:
            self._batch_added()

    def _check_data_version(self) -> None:
        """Forget every row read if another connection committed since the last check."""
        data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if data_version != self._data_version:
            self._forget_reads()
            self._data_version = data_version

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """A call that only reads, outside any transaction (its audit record goes to
        :meth:`append_audit_batched`). Rows read earlier are reused as in a transaction:
        the check at its start forgets them if another connection has committed since.
        """
        self._check_data_version()
        self._reading = True
        try:
            yield
        finally:
            self._reading = False

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested scope inside :meth:`transaction` that is undone alone on error."""
        self._conn.execute("SAVEPOINT op")
        try:
            yield
        except BaseException:
            self._forget_reads()
            self._conn.execute("ROLLBACK TO op")
            self._conn.execute("RELEASE op")
            raise
        self._conn.execute("RELEASE op")

    def _forget_reads(self) -> None:
        self._reads.clear()
        self.audit.forget_head()

    def _cached(self, kind: str, name: str) -> Any:
        """A row read earlier, or ``_MISS``; only inside a transaction or :meth:`reading`."""
        if not (self._reading or self._conn.in_transaction):
            return _MISS
        return self._reads.get((kind, name), _MISS)

    def _remember(self, kind: str, name: str, value: Any) -> None:
        if self._reading or self._conn.in_transaction:
            if len(self._reads) >= _READ_CACHE_SIZE:
                self._reads.clear()
            self._reads[(kind, name)] = value

    # --- keys --------------------------------------------------------------------------

    @staticmethod
    def _mutable_columns(key: KeyRecord) -> tuple[object, ...]:
        """The values of the columns after ``key_id`` and ``created``, in table order."""
        return (
            key.description,
            key.state.value,
            key.deletion_date,
            key.pending_window_days,
            key.rotation_period_days,
            key.next_rotation,
            key.policy,
        )

    def insert_key(self, key: KeyRecord) -> None:
        self._reads.clear()
        self._conn.execute(
            "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key.key_id, key.created, *self._mutable_columns(key)),
        )

    def update_key(self, key: KeyRecord) -> None:
        self._reads.clear()
        self._conn.execute(
            "UPDATE keys SET description=?, state=?, deletion_date=?, pending_window_days=?,"
            " rotation_period_days=?, next_rotation=?, policy=? WHERE key_id=?",
            (*self._mutable_columns(key), key.key_id),
        )

    def get_key(self, key_id: str) -> KeyRecord | None:
        """A key's row (a copy: the caller may change it and :meth:`update_key`)."""
        row = self._cached("key", key_id)
        if row is _MISS:
            row = self._conn.execute("SELECT * FROM keys WHERE key_id=?", (key_id,)).fetchone()
            self._remember("key", key_id, row)
        if row is None:
            return None
        return KeyRecord(
            row[0], row[1], row[2], KeyState(row[3]), row[4], row[5], row[6], row[7], row[8]
        )

    def list_key_ids(self, after: str | None, limit: int) -> list[str]:
        rows = self._conn.execute(
            "SELECT key_id FROM keys WHERE key_id > ? ORDER BY key_id LIMIT ?",
            (after or "", limit),
        ).fetchall()
        return [r[0] for r in rows]

    def due_key_ids(self, now: float) -> list[str]:
        """Keys whose scheduled deletion or automatic rotation is due."""
        rows = self._conn.execute(
            "SELECT key_id FROM keys WHERE (state=? AND deletion_date<=?)"
            " OR (state=? AND next_rotation<=?) ORDER BY key_id",
            (KeyState.PENDING_DELETION.value, now, KeyState.ENABLED.value, now),
        ).fetchall()
        return [r[0] for r in rows]

    def destroy_key(self, key_id: str) -> None:
        """Delete a key with its material, aliases and tags (``secure_delete`` is on)."""
        self._reads.clear()
        self._conn.execute("DELETE FROM keys WHERE key_id=?", (key_id,))

    def checkpoint(self) -> None:
        """Move the WAL into the database and truncate it, so deleted pages are gone."""
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # --- key versions ------------------------------------------------------------------

    def _material_aad(self, key_id: str, version: int) -> bytes:
        return (
            b"envfs-kms v1 material"
            + _lp(self.region.encode())
            + _lp(key_id.encode())
            + struct.pack(">I", version)
        )

    def add_version(
        self, key_id: str, version: int, material: bytes, created: float, rotation_type: str | None
    ) -> None:
        self._reads.clear()
        sealed = self._material.seal(material, self._material_aad(key_id, version))
        self._conn.execute(
            "INSERT INTO key_versions VALUES (?, ?, ?, ?, ?)",
            (key_id, version, created, rotation_type, sealed),
        )

    def get_material(self, key_id: str, version: int) -> bytes | None:
        row = self._conn.execute(
            "SELECT material FROM key_versions WHERE key_id=? AND version=?", (key_id, version)
        ).fetchone()
        if row is None:
            return None
        try:
            return self._material.open(bytes(row[0]), self._material_aad(key_id, version))
        except IntegrityError:
            raise StoreCorruptError(
                f"sealed material of key {key_id!r} version {version} does not verify"
            ) from None

    def versions(self, key_id: str) -> list[KeyVersion]:
        cached = self._cached("versions", key_id)
        if cached is _MISS:
            rows = self._conn.execute(
                "SELECT version, created, rotation_type FROM key_versions WHERE key_id=?"
                " ORDER BY version",
                (key_id,),
            ).fetchall()
            cached = tuple(KeyVersion(r[0], r[1], r[2]) for r in rows)
            self._remember("versions", key_id, cached)
        return list(cached)

    # --- aliases -----------------------------------------------------------------------

    def get_alias(self, name: str) -> tuple[str, float, float] | None:
        """``(key id, created, updated)`` of an alias, or None."""
        cached = self._cached("alias", name)
        if cached is _MISS:
            row = self._conn.execute(
                "SELECT key_id, created, updated FROM aliases WHERE name=?", (name,)
            ).fetchone()
            cached = None if row is None else (row[0], row[1], row[2])
            self._remember("alias", name, cached)
        return cached  # type: ignore[no-any-return]

    def put_alias(self, name: str, key_id: str, now: float) -> None:
        self._reads.clear()
        self._conn.execute(
            "INSERT INTO aliases VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE"
            " SET key_id=excluded.key_id, updated=excluded.updated",
            (name, key_id, now, now),
        )

    def delete_alias(self, name: str) -> None:
        self._reads.clear()
        self._conn.execute("DELETE FROM aliases WHERE name=?", (name,))

    def list_aliases(
        self, key_id: str | None, after: str | None, limit: int
    ) -> list[tuple[str, str, float, float]]:
        """``(name, key id, created, updated)`` rows in name order."""
        sql = "SELECT name, key_id, created, updated FROM aliases WHERE name > ?"
        args: list[Any] = [after or ""]
        if key_id is not None:
            sql += " AND key_id=?"
            args.append(key_id)
        sql += " ORDER BY name LIMIT ?"
        args.append(limit)
        rows = self._conn.execute(sql, args).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    # --- tags --------------------------------------------------------------------------

    def tags(self, key_id: str) -> dict[str, str]:
        rows = self._conn.execute(
            "SELECT tag_key, tag_value FROM tags WHERE key_id=? ORDER BY tag_key", (key_id,)
        ).fetchall()
        return {r[0]: r[1] for r in rows}

    def set_tag(self, key_id: str, tag_key: str, tag_value: str) -> None:
        self._conn.execute(
            "INSERT INTO tags VALUES (?, ?, ?) ON CONFLICT(key_id, tag_key) DO UPDATE"
            " SET tag_value=excluded.tag_value",
            (key_id, tag_key, tag_value),
        )

    def remove_tag(self, key_id: str, tag_key: str) -> None:
        self._conn.execute("DELETE FROM tags WHERE key_id=? AND tag_key=?", (key_id, tag_key))

    # --- access keys -------------------------------------------------------------------

    def _access_secret_aad(self, access_key_id: str, uid: int) -> bytes:
        """The secret is bound to its key id and to the user it belongs to: a row whose
        uid was changed (a key given to root, say) no longer opens."""
        return (
            b"envfs-kms v1 access key secret"
            + _lp(self.region.encode())
            + _lp(access_key_id.encode())
            + _lp(str(uid).encode())
        )

    def insert_access_key(self, key: AccessKeyRecord, secret: bytes) -> None:
        """Add an access key, its secret sealed (inside the caller's transaction)."""
        sealed = self._access_secret.seal(
            secret, self._access_secret_aad(key.access_key_id, key.uid)
        )
        self._conn.execute(
            "INSERT INTO access_keys VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key.access_key_id,
                key.uid,
                key.user_name,
                key.status.value,
                key.created,
                key.last_used,
                sealed,
            ),
        )

    def get_access_key(self, access_key_id: str) -> AccessKeyRecord | None:
        row = self._conn.execute(
            "SELECT access_key_id, uid, user_name, status, created, last_used"
            " FROM access_keys WHERE access_key_id=?",
            (access_key_id,),
        ).fetchone()
        return None if row is None else _access_key_record(row)

    def list_access_keys(self, uid: int | None) -> list[AccessKeyRecord]:
        """Every access key (of ``uid`` only, if given), oldest first."""
        sql = "SELECT access_key_id, uid, user_name, status, created, last_used FROM access_keys"
        args: tuple[int, ...] = ()
        if uid is not None:
            sql += " WHERE uid=?"
            args = (uid,)
        rows = self._conn.execute(sql + " ORDER BY created, access_key_id", args).fetchall()
        return [_access_key_record(r) for r in rows]

    def set_access_key_status(self, access_key_id: str, status: AccessKeyStatus) -> None:
        self._conn.execute(
            "UPDATE access_keys SET status=? WHERE access_key_id=?", (status.value, access_key_id)
        )

    def mark_access_key_used(self, access_key_id: str, when: float) -> None:
        """Record a use (for the HTTP endpoint; inside the caller's transaction)."""
        self._conn.execute(
            "UPDATE access_keys SET last_used=? WHERE access_key_id=?", (when, access_key_id)
        )

    def delete_access_key(self, access_key_id: str) -> None:
        """Delete an access key and its sealed secret (``secure_delete`` is on)."""
        self._conn.execute("DELETE FROM access_keys WHERE access_key_id=?", (access_key_id,))

    def access_key_secret(self, access_key_id: str) -> tuple[bytes, int] | None:
        """The secret and uid of an *Active* access key, or None (unknown or Inactive).

        For the HTTP endpoint's signature check; no operation returns a secret.

        Raises:
            StoreCorruptError: the sealed secret does not open (altered, or moved from
                another row).
        """
        row = self._conn.execute(
            "SELECT uid, status, secret FROM access_keys WHERE access_key_id=?",
            (access_key_id,),
        ).fetchone()
        if row is None or row[1] != AccessKeyStatus.ACTIVE.value:
            return None
        try:
            aad = self._access_secret_aad(access_key_id, int(row[0]))
            secret = self._access_secret.open(bytes(row[2]), aad)
        except IntegrityError:
            raise StoreCorruptError(
                f"sealed secret of access key {access_key_id!r} does not verify"
            ) from None
        return secret, int(row[0])

    # --- audit log (envfs.kms.audit) ----------------------------------------------------

    def _chain(self, records: list[EncodedRecord]) -> int:
        """Append records to the chain (inside a transaction); the last one's seq.

        Raises:
            AuditLogDamagedError: the log cannot take a record (nothing was written).
        """
        try:
            return self.audit.extend(records)
        except DamagedChain as exc:
            raise AuditLogDamagedError(damaged_log_message(exc.problem)) from None

    def append_audit(self, record: dict[str, Any]) -> int:
        """Append one record to the audit chain (inside the caller's transaction).

        Raises:
            AuditLogDamagedError: the log cannot take it: the call must fail, unless it
                is the one that reported the damage (see :meth:`audit_verification`);
                its record is then left out, with a warning, and 0 returned.
        """
        try:
            return self._chain([EncodedRecord(record)])
        except AuditLogDamagedError:
            if not self._damage_reported:
                raise
            logger.info("the call that reported the damaged audit log is not audited")
            return 0

    def audit_records(self, after_seq: int, limit: int) -> list[dict[str, Any]]:
        return self.audit.records(after_seq, limit)

    def verify_audit(self) -> tuple[int, str | None]:
        """``(records, None)`` if the chain is intact, else ``(checked, problem)``."""
        verification = self.audit.verify()
        problem = verification.problem
        return verification.records, problem.text if problem is not None else None

    def audit_verification(self) -> Verification:
        """Walk the chain (:meth:`AuditLog.verify`). If the log is damaged so that it
        cannot take a record, the record of the call in this transaction (VerifyAudit,
        which tells its caller) may be left out; every other call still fails."""
        verification = self.audit.verify()
        if verification.problem is not None and verification.problem.blocking:
            self._damage_reported = self._conn.in_transaction
        return verification


def damaged_log_message(problem: Problem) -> str:
    """What an audited call says when the log cannot take its record."""
    return (
        f"the audit log is damaged: {problem.text}; no call can be audited, so none is"
        " served until it is repaired: see 'envfs kms audit --verify', then run 'envfs kms"
        " audit --repair --archive FILE' as the store's owner to move the damage aside"
    )


def _access_key_record(row: tuple[Any, ...]) -> AccessKeyRecord:
    return AccessKeyRecord(row[0], int(row[1]), row[2], AccessKeyStatus(row[3]), row[4], row[5])


def _connect(path: Path) -> sqlite3.Connection:
    old_umask = os.umask(0o077)
    try:
        conn = sqlite3.connect(
            str(path), isolation_level=None, timeout=10.0, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # FULL for each change: transaction()
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        raise StoreCorruptError(f"key store {str(path)!r} cannot be read: {exc}") from None
    finally:
        os.umask(old_umask)
    return conn


def _read_meta(db_path: Path, name: str) -> bytes | None:
    try:
        conn = sqlite3.connect(f"{db_path.absolute().as_uri()}?mode=ro", uri=True, timeout=10.0)
    except sqlite3.DatabaseError as exc:
        raise StoreCorruptError(f"key store {str(db_path)!r} cannot be read: {exc}") from None
    try:
        row = conn.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
    except sqlite3.DatabaseError as exc:
        raise StoreCorruptError(f"key store {str(db_path)!r} cannot be read: {exc}") from None
    finally:
        conn.close()
    if row is None:
        return None
    value = row[0]
    if isinstance(value, bytes):
        return value
    return str(value).encode()
