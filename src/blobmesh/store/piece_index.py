"""An index of piece hashes: which stored blob holds a piece identical to one we need.

A new version of a model rewrites some tensors in place; most of its pieces are pieces of the
version already here.  Before fetching a blob, :func:`fill_from_index` copies every piece the
index knows into the partial blob (each verified against the new piece layer, so a stale or
wrong index entry costs a read, never bad data).

The index lives in its own SQLite file (``HOME/pieces.sqlite``), is filled lazily from the
store's complete blobs (:meth:`PieceIndex.sync`) and is bounded: beyond ``max_pieces`` the
oldest-indexed blobs are dropped from it.  A piece hash names its content and its length (a
node of the hash tree binds every leaf under it), so equal hashes mean equal bytes whatever
the blob.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from blobmesh.errors import StoreError, VerificationError
from blobmesh.hashing import BlobId, PieceLayer
from blobmesh.store import PartialBlob, Store
from blobmesh.store.layout import private_database

DEFAULT_MAX_PIECES = 1 << 20  # ~100 MiB of index; 256 GiB of blobs at 256 KiB pieces
_CANDIDATES = 4  # holders tried per piece

_SCHEMA = """
CREATE TABLE IF NOT EXISTS indexed (
    blob BLOB PRIMARY KEY,
    pieces INTEGER NOT NULL,  -- 0 once evicted: never indexed again
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pieces (
    hash BLOB NOT NULL,
    blob BLOB NOT NULL,
    idx INTEGER NOT NULL,
    PRIMARY KEY (hash, blob, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pieces_blob ON pieces(blob);
"""


@dataclass(frozen=True, slots=True)
class Reused:
    pieces: int = 0
    bytes: int = 0


class PieceIndex:
    """Piece hash -> (blob, piece index) for the complete blobs of one store."""

    def __init__(self, store: Store, max_pieces: int = DEFAULT_MAX_PIECES) -> None:
        self.store = store
        self.max_pieces = max_pieces
        self._lock = threading.Lock()
        path = store.home / "pieces.sqlite"
        try:
            private_database(path)
            self._db = sqlite3.connect(path, timeout=60.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # a lost update is re-synced
            self._db.executescript(_SCHEMA)
            private_database(path)  # its -wal and -shm files, now they exist
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the piece index {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def sync(self) -> int:
        """Index complete blobs not indexed yet, forget blobs that left; returns blobs added.

        Single-piece blobs are skipped: their one piece is the whole blob, found by its id.
        """
        here = {b.blob_id for b in self.store.blobs() if b.complete and b.pieces_total > 1}
        with self._lock:
            known = {BlobId(bytes(r[0])) for r in self._db.execute("SELECT blob FROM indexed")}
        gone = known - here
        added = 0
        for blob_id in here - known:
            try:
                layer = self.store.piece_layer(blob_id)
            except StoreError:
                continue
            self.record(layer)
            added += 1
        if gone:
            with self._lock, self._txn():
                for blob_id in gone:
                    self._drop(blob_id)
        return added

    def record(self, layer: PieceLayer) -> None:
        """Index one blob's piece layer, evicting the oldest blobs beyond the bound."""
        digest = layer.blob_id.digest
        with self._lock, self._txn():
            if self._db.execute("SELECT 1 FROM indexed WHERE blob=?", (digest,)).fetchone():
                return
            self._db.executemany("INSERT OR IGNORE INTO pieces VALUES (?,?,?)",
                                 ((h, digest, i) for i, h in enumerate(layer.hashes)))
            self._db.execute("INSERT INTO indexed VALUES (?,?,?)",
                             (digest, len(layer), time.time_ns()))
            total = self._db.execute("SELECT sum(pieces) FROM indexed").fetchone()[0] or 0
            while total > self.max_pieces:
                row = self._db.execute("SELECT blob, pieces FROM indexed WHERE pieces>0 "
                                       "ORDER BY seq LIMIT 1").fetchone()
                if row is None:
                    break
                self._db.execute("DELETE FROM pieces WHERE blob=?", (row[0],))
                self._db.execute("UPDATE indexed SET pieces=0 WHERE blob=?", (row[0],))
                total -= row[1]

    def lookup(self, piece_hash: bytes) -> list[tuple[BlobId, int]]:
        """Blobs (and piece indices in their own layers) holding a piece with this hash."""
        with self._lock:
            rows = self._db.execute("SELECT blob, idx FROM pieces WHERE hash=? LIMIT ?",
                                    (piece_hash, _CANDIDATES)).fetchall()
        return [(BlobId(bytes(b)), int(i)) for b, i in rows]

    @property
    def pieces(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM pieces").fetchone()[0])

    def _drop(self, blob_id: BlobId) -> None:
        self._db.execute("DELETE FROM pieces WHERE blob=?", (blob_id.digest,))
        self._db.execute("DELETE FROM indexed WHERE blob=?", (blob_id.digest,))

    @contextmanager
    def _txn(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def fill_from_index(index: PieceIndex, partial: PartialBlob) -> Reused:
    """Copy into ``partial`` every missing piece some stored blob holds; returns what moved.

    Each copy is verified against the partial's piece layer by ``write_piece``; the pieces are
    flushed (durable and present) before this returns.
    """
    layer = partial.layer
    missing = partial.missing()
    if not missing or len(layer) == 1:
        return Reused()  # a one-piece blob's piece is the blob: it would be here by its id
    index.sync()
    pieces = nbytes = 0
    for i in missing:
        for holder, at in index.lookup(layer.hashes[i]):
            if holder == layer.blob_id:
                continue
            try:
                data = index.store.read_piece(holder, at, verify=False)
                partial.write_piece(i, data)
            except (StoreError, VerificationError):
                continue  # collected meanwhile, or the disk lied: try another holder
            pieces += 1
            nbytes += len(data)
            break
    if pieces:
        partial.flush()
    return Reused(pieces, nbytes)
