"""The store's metadata: one SQLite (WAL) database of blobs, leases and pins.

:class:`MetaDB` owns the connection.  Every write goes through :meth:`MetaDB.write`, a
``BEGIN IMMEDIATE`` transaction that holds SQLite's write lock for its whole body, so file
moves made inside it cannot interleave with another process's.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from blobmesh.errors import BlobIncompleteError, BlobNotFoundError, StoreError, StoreFullError
from blobmesh.hashing import BlobId, piece_count
from blobmesh.store.layout import Layout, private_database
from blobmesh.store.leases import LeaseId, pid_alive, pid_start_time
from blobmesh.store.types import BlobInfo, Pin
from blobmesh.types import Bitfield

Undo = list[Callable[[], object]]
"""Actions that revert file moves when their write transaction does not commit."""

FORMAT = 2
"""The store's format (``PRAGMA user_version``): 2 added the ``layers`` and ``contents``
tables.  A store of a later format is refused rather than misread."""

BUSY_TIMEOUT = 60.0
"""How long a statement waits for another process's write lock before it fails."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    id BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    piece_size INTEGER NOT NULL,
    complete INTEGER NOT NULL,
    have BLOB NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    blob BLOB NOT NULL,
    consumer TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start INTEGER,
    created REAL NOT NULL,
    PRIMARY KEY (blob, consumer, pid)
);
CREATE INDEX IF NOT EXISTS leases_pid ON leases(pid);
CREATE TABLE IF NOT EXISTS pins (
    name TEXT PRIMARY KEY,
    blob BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pins_blob ON pins(blob);
CREATE TABLE IF NOT EXISTS layers (
    id BLOB PRIMARY KEY,
    hashes BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS contents (
    id BLOB PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS blobs_layer AFTER DELETE ON blobs BEGIN
    DELETE FROM layers WHERE id = old.id;
    DELETE FROM contents WHERE id = old.id;
END;
CREATE TABLE IF NOT EXISTS verified (
    id BLOB PRIMARY KEY,
    file TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TRIGGER IF NOT EXISTS blobs_verified AFTER DELETE ON blobs BEGIN
    DELETE FROM verified WHERE id = old.id;
END;
"""
"""``layers`` holds the piece layers of blobs added from memory (``ingest.HELD_MAX``), which
have no ``.pieces`` file; ``contents`` the data of those added *inline* (no data file either);
every other blob's layer and data are files (``docs/store.md``).  ``verified`` remembers the
last full verification of a complete blob's data file: which file it was (see
:func:`blobmesh.store.readers.verify_complete`) and when.  A store without it (an older
format 2) gets it on open; older code ignores it."""

_ROW = "SELECT id, size, piece_size, complete, have, created FROM blobs"


class MetaDB:
    """The metadata database of one store; usable from several threads (one lock)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.lock = threading.RLock()
        home = str(layout.home)
        try:
            private_database(layout.db)
            self.conn = sqlite3.connect(layout.db, timeout=BUSY_TIMEOUT, isolation_level=None,
                                        check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
            version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
            if version > FORMAT:
                self.conn.close()
                raise StoreError(f"the store {home} is of format {version}; this blobmesh "
                                 f"reads formats up to {FORMAT} (upgrade it)", home=home)
            self.conn.executescript(_SCHEMA)
            if version < FORMAT:
                self.conn.execute(f"PRAGMA user_version={FORMAT}")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the store database {layout.db}: {exc}",
                             home=home) from exc
        private_database(layout.db)  # the -wal and -shm files of a home from before the rule

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    @contextmanager
    def write(self, undo: Undo | None = None) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock for its whole duration.

        When it does not commit (the body raised, or COMMIT failed, e.g. on a full disk) the
        ``undo`` actions run newest first while the write lock is still held, so no other
        process sees files that disagree with the rows.
        """
        with self.lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:  # e.g. locked for too long
                raise self.error(exc) from exc
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException as exc:
                for action in reversed(undo or ()):
                    with suppress(OSError):
                        action()
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self.error(exc) from exc
                raise

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            try:
                return list(self.conn.execute(sql, args))
            except sqlite3.Error as exc:
                raise self.error(exc) from exc

    def error(self, exc: sqlite3.Error) -> StoreError:
        """A one-line store error for a failed SQLite statement (e.g. locked for too long)."""
        home = str(self.layout.home)
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return StoreFullError(f"disk full: cannot update the store database in {home}",
                                  home=home)
        return StoreError(f"store database {self.layout.db}: {exc}", home=home)

    # --- rows ------------------------------------------------------------------------------

    def find_row(self, blob_id: BlobId) -> tuple[Any, ...] | None:
        """(id, size, piece_size, complete, have, created), or None when absent."""
        rows = self.query(_ROW + " WHERE id=?", (blob_id.digest,))
        return rows[0] if rows else None

    def layer_row(self, blob_id: BlobId) -> tuple[int, int, bytes | None]:
        """(size, piece_size, the layer's hashes if ``layers`` holds them); raises
        BlobNotFoundError when the blob is absent."""
        rows = self.query("SELECT size, piece_size, hashes FROM blobs LEFT JOIN layers "
                          "USING (id) WHERE id=?", (blob_id.digest,))
        if not rows:
            raise BlobNotFoundError(f"blob {blob_id} is not in the store", blob_id=blob_id)
        size, piece_size, hashes = rows[0]
        return int(size), int(piece_size), None if hashes is None else bytes(hashes)

    def content(self, blob_id: BlobId) -> bytes | None:
        """:func:`inline_content`, outside any transaction."""
        with self.lock:
            try:
                return inline_content(self.conn, blob_id)
            except sqlite3.Error as exc:
                raise self.error(exc) from exc

    def blob_row(self, blob_id: BlobId) -> tuple[Any, ...]:
        """:meth:`find_row`, raising BlobNotFoundError when absent."""
        row = self.find_row(blob_id)
        if row is None:
            raise BlobNotFoundError(f"blob {blob_id} is not in the store", blob_id=blob_id)
        return row

    def has(self, blob_id: BlobId) -> bool:
        """True when the complete blob is here."""
        rows = self.query("SELECT complete FROM blobs WHERE id=?", (blob_id.digest,))
        return bool(rows and rows[0][0])

    def bitfield(self, blob_id: BlobId) -> Bitfield:
        row = self.blob_row(blob_id)
        return Bitfield(piece_count(int(row[1]), int(row[2])), bytes(row[4]))

    def find_bitfield(self, blob_id: BlobId) -> Bitfield | None:
        """The present pieces, or None when the blob is not here at all."""
        row = self.find_row(blob_id)
        return None if row is None else Bitfield(piece_count(int(row[1]), int(row[2])),
                                                 bytes(row[4]))

    def info(self, blob_id: BlobId) -> BlobInfo:
        row = self.blob_row(blob_id)
        pins = tuple(str(r[0]) for r in self.query(
            "SELECT name FROM pins WHERE blob=? ORDER BY name", (blob_id.digest,)))
        nleases = int(self.query("SELECT count(*) FROM leases WHERE blob=?",
                                 (blob_id.digest,))[0][0])
        return info_from_row(row, pins, nleases)

    def infos(self, blob_ids: Sequence[BlobId]) -> list[BlobInfo]:
        """:meth:`info` of many blobs in three queries per :data:`ID_BATCH`."""
        out: dict[BlobId, BlobInfo] = {}
        unique = list(dict.fromkeys(blob_ids))
        for digests, marks in id_batches(unique):
            pins: dict[bytes, list[str]] = {}
            for name, blob in self.query(f"SELECT name, blob FROM pins WHERE blob IN ({marks})"
                                         " ORDER BY name", digests):
                pins.setdefault(bytes(blob), []).append(str(name))
            counts = {bytes(b): int(n) for b, n in self.query(
                f"SELECT blob, count(*) FROM leases WHERE blob IN ({marks}) GROUP BY blob",
                digests)}
            for row in self.query(_ROW + f" WHERE id IN ({marks})", digests):
                d = bytes(row[0])
                out[BlobId(d)] = info_from_row(row, tuple(pins.get(d, ())), counts.get(d, 0))
        missing = [b for b in unique if b not in out]
        if missing:
            raise BlobNotFoundError(f"blob {missing[0]} is not in the store", blob_id=missing[0])
        return [out[b] for b in blob_ids]

    def complete_sizes(self, blob_ids: Sequence[BlobId]) -> dict[BlobId, int]:
        """Sizes of those of ``blob_ids`` that are here complete (one query per
        :data:`ID_BATCH`)."""
        out: dict[BlobId, int] = {}
        for digests, marks in id_batches(blob_ids):
            for d, size in self.query(f"SELECT id, size FROM blobs WHERE complete=1 AND id IN "
                                      f"({marks})", digests):
                out[BlobId(bytes(d))] = int(size)
        return out

    def blobs(self) -> list[BlobInfo]:
        rows = self.query(_ROW + " ORDER BY created, id")
        pins: dict[bytes, list[str]] = {}
        for name, blob in self.query("SELECT name, blob FROM pins"):
            pins.setdefault(bytes(blob), []).append(str(name))
        counts = {bytes(b): int(n) for b, n in
                  self.query("SELECT blob, count(*) FROM leases GROUP BY blob")}
        return [info_from_row(r, tuple(sorted(pins.get(bytes(r[0]), []))),
                              counts.get(bytes(r[0]), 0))
                for r in rows]

    def pins(self) -> list[Pin]:
        return [Pin(str(n), BlobId(bytes(b)), float(c))
                for n, b, c in self.query("SELECT name, blob, created FROM pins ORDER BY name")]

    def leases(self, blob_id: BlobId | None = None) -> list[tuple[BlobId, LeaseId, bool]]:
        sql = "SELECT blob, consumer, pid, pid_start FROM leases"
        rows = self.query(sql + " WHERE blob=?", (blob_id.digest,)) if blob_id else \
            self.query(sql)
        return [(BlobId(bytes(b)), LeaseId(str(c), int(p)), pid_alive(int(p), s))
                for b, c, p, s in rows]

    def drop_lease(self, lease: LeaseId, blob_id: BlobId) -> None:
        with self.write() as db:
            db.execute("DELETE FROM leases WHERE blob=? AND consumer=? AND pid=?",
                       (blob_id.digest, lease.consumer, lease.pid))

    def verified(self, blob_id: BlobId) -> tuple[str, float] | None:
        """(file, when) of the blob's last recorded full verification, or None."""
        rows = self.query("SELECT file, at FROM verified WHERE id=?", (blob_id.digest,))
        return (str(rows[0][0]), float(rows[0][1])) if rows else None

    def set_verified(self, blob_id: BlobId, file: str, at: float) -> None:
        """Record a full verification of the blob's data ``file`` (its ``file_key``) made at
        ``at``."""
        with self.write() as db:
            if has_row(db, blob_id):  # not for a blob collected meanwhile
                record_verified(db, [(blob_id, file)], at)

    def forget_verified(self, blob_id: BlobId) -> None:
        """The blob was found corrupt: its last verification no longer counts."""
        with self.write() as db:
            db.execute("DELETE FROM verified WHERE id=?", (blob_id.digest,))

    def merge_pieces(self, updates: Sequence[tuple[BlobId, Sequence[int]]]) -> list[Bitfield]:
        """Mark pieces present (their data is already durable), many blobs in one
        transaction; completes each blob that becomes full.  The present sets, in order."""
        out: list[Bitfield] = []
        now = time.time()
        with self.write() as db:
            for blob_id, indices in updates:
                row = db.execute("SELECT size, piece_size, have, complete FROM blobs "
                                 "WHERE id=?", (blob_id.digest,)).fetchone()
                if row is None:
                    raise BlobNotFoundError(f"blob {blob_id} vanished while being written",
                                            blob_id=blob_id)
                have = Bitfield(piece_count(row[0], row[1]), bytes(row[2]))
                have.update(indices)
                complete = 1 if (row[3] or have.is_complete()) else 0
                db.execute("UPDATE blobs SET have=?, complete=?, updated=? WHERE id=?",
                           (have.to_bytes(), complete, now, blob_id.digest))
                out.append(have)
        return out


# --- statements inside a caller's write transaction ----------------------------------------


ID_BATCH = 500
"""Ids per ``IN (...)`` list: one query per this many, well under SQLite's variable limit."""


def id_batches(blob_ids: Iterable[BlobId]) -> Iterator[tuple[tuple[bytes, ...], str]]:
    """The distinct digests of ``blob_ids`` in batches of :data:`ID_BATCH`, each with the
    ``?,?,...`` of its ``IN`` list."""
    unique = list(dict.fromkeys(b.digest for b in blob_ids))
    for i in range(0, len(unique), ID_BATCH):
        part = tuple(unique[i : i + ID_BATCH])
        yield part, ",".join("?" * len(part))


def inline_content(db: sqlite3.Connection, blob_id: BlobId) -> bytes | None:
    """The data of a blob kept inline (in ``contents``); None for any other."""
    row = db.execute("SELECT data FROM contents WHERE id=?", (blob_id.digest,)).fetchone()
    return None if row is None else bytes(row[0])


def record_verified(db: sqlite3.Connection, files: Iterable[tuple[BlobId, str]], at: float
                    ) -> None:
    """Record that each blob's data file (a ``layout.file_key``) matched its id at ``at``."""
    db.executemany("INSERT OR REPLACE INTO verified VALUES (?,?,?)",
                   [(blob_id.digest, key, at) for blob_id, key in files])


def has_row(db: sqlite3.Connection, blob_id: BlobId) -> bool:
    return db.execute("SELECT 1 FROM blobs WHERE id=?", (blob_id.digest,)).fetchone() is not None


def add_lease(db: sqlite3.Connection, blob_id: BlobId, lease: LeaseId) -> None:
    # Taking a lease again refreshes its process start time: a row left by a dead process
    # whose pid (and stable consumer name) was reused must not make the new lease look dead.
    start = _own_start_time() if lease.pid == os.getpid() else pid_start_time(lease.pid)
    db.execute("INSERT INTO leases VALUES (?,?,?,?,?) ON CONFLICT (blob, consumer, pid) "
               "DO UPDATE SET pid_start=excluded.pid_start",
               (blob_id.digest, lease.consumer, lease.pid, start, time.time()))


_own: tuple[int, int | None] | None = None


def _own_start_time() -> int | None:
    """This process's start time, read once per pid (a fork reads its own)."""
    global _own
    pid = os.getpid()
    if _own is None or _own[0] != pid:
        _own = (pid, pid_start_time(pid))
    return _own[1]


def require_complete(db: sqlite3.Connection, blob_id: BlobId) -> int:
    """The size of a complete blob; raises if it is missing or partial."""
    row = db.execute("SELECT complete, size FROM blobs WHERE id=?",
                     (blob_id.digest,)).fetchone()
    if row is None:
        raise BlobNotFoundError(f"blob {blob_id} is not in the store", blob_id=blob_id)
    if not row[0]:
        raise BlobIncompleteError(f"blob {blob_id} is only partially present", blob_id=blob_id)
    return int(row[1])


def info_from_row(row: tuple[Any, ...], pins: tuple[str, ...], leases: int) -> BlobInfo:
    digest, size, piece_size, complete, have_raw, created = row
    total = piece_count(size, piece_size)
    have = Bitfield.full(total) if complete else Bitfield(total, bytes(have_raw))
    present = have.count()
    nbytes = present * piece_size
    if total - 1 in have:  # the last piece is short
        nbytes -= total * piece_size - size
    return BlobInfo(BlobId(bytes(digest)), size, piece_size, bool(complete), present,
                    total, float(created), nbytes, pins, leases)
