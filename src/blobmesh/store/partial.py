"""Writing a blob piece by piece, in any order, from any number of sources."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable
from contextlib import ExitStack

from blobmesh.errors import BlobIncompleteError, StoreFullError, VerificationError
from blobmesh.hashing import BlobId, Buffer, PieceLayer
from blobmesh.store.db import MetaDB
from blobmesh.store.layout import Layout
from blobmesh.store.leases import LeaseId
from blobmesh.types import Bitfield

FLUSH_BYTES = 32 * 1024 * 1024


class PartialBlob:
    """A writer for one partial blob (made by ``Store.begin_partial``).

    Every piece is verified against the piece layer before it is written.  Written pieces
    become *present* (visible to readers and to other processes) at :meth:`flush`, after the
    data is durable, so a crash never marks a piece present whose bytes are not on disk.
    Flushing happens by itself every 32 MiB and on :meth:`close`; :func:`flush_many` flushes
    many writers in one transaction.
    """

    def __init__(self, db: MetaDB, layout: Layout, layer: PieceLayer, lease: LeaseId) -> None:
        self.layer = layer
        self.lease = lease
        self._db = db
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush (or close) at a time
        # read-write: pieces written but not yet flushed can already be served to peers
        self._fd = os.open(layout.data_path(layer.blob_id), os.O_RDWR)
        self._pending: dict[int, int] = {}  # written, not yet durable: index -> length
        self._pending_bytes = 0
        self._writing: set[int] = set()  # claimed by a write_piece under way
        self._written = threading.Condition(self._lock)  # notified as ``_writing`` shrinks
        self._closing = False  # close began: no write starts any more
        self._have = db.bitfield(layer.blob_id)

    @property
    def blob_id(self) -> BlobId:
        return self.layer.blob_id

    @property
    def have(self) -> Bitfield:
        """Pieces present or written (pending flush)."""
        with self._lock:
            bf = self._have.copy()
            bf.update(self._pending)
            return bf

    def missing(self) -> list[int]:
        return self.have.missing()

    def is_complete(self) -> bool:
        return self.have.is_complete()

    def write_piece(self, index: int, data: Buffer) -> bool:
        """Verify and write piece ``index``; returns False if it was already present.

        Raises :class:`VerificationError` (nothing written) when the data is wrong.
        """
        self.layer.verify_piece(index, data)
        with self._lock:
            # claimed under the lock: two copies of one piece (end game) written from two
            # threads must not both count as new
            if index in self._have or index in self._pending or index in self._writing:
                return False
            if self._closing:  # (its descriptor is closed, or about to be)
                raise OSError(errno.EBADF, f"partial blob {self.blob_id.short()} is closed")
            self._writing.add(index)
        start, _ = self.layer.piece_range(index)
        mv = memoryview(data).cast("B")
        try:
            while mv:  # one pwrite unless the kernel writes short
                n = os.pwrite(self._fd, mv, start)
                mv, start = mv[n:], start + n
        except OSError as exc:
            with self._lock:
                self._writing.discard(index)
                self._written.notify_all()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFullError(f"disk full writing {self.blob_id.short()}",
                                     blob_id=self.blob_id) from exc
            raise
        with self._lock:
            self._writing.discard(index)
            self._written.notify_all()
            self._pending[index] = len(data)
            self._pending_bytes += len(data)
            due = self._pending_bytes >= FLUSH_BYTES
        if due:
            self.flush()
        return True

    def read_piece(self, index: int) -> bytes:
        """Read back a piece this writer holds (present or written, flushed or not).

        The data was verified when it was written; callers that pass it on should still
        check it against the layer (the disk may have lied since).
        """
        with self._lock:
            held = index in self._have or index in self._pending
        if not held:
            raise BlobIncompleteError(f"piece {index} of {self.blob_id.short()} is not here",
                                      blob_id=self.blob_id, piece=index)
        start, length = self.layer.piece_range(index)
        return os.pread(self._fd, length, start)

    def flush(self) -> Bitfield:
        """Make written pieces durable and present; returns the present set."""
        return flush_many(self._db, [self])[0]

    def _sync(self) -> set[int]:
        """The pending pieces, made durable (caller holds the flush lock)."""
        with self._lock:
            pending = set(self._pending)
        if pending:
            os.fdatasync(self._fd)
        return pending

    def _settle(self, pending: set[int], have: Bitfield) -> Bitfield:
        """``pending`` are present now; pieces written meanwhile stay pending."""
        with self._lock:
            self._have = have
            for index in pending:
                self._pending_bytes -= self._pending.pop(index)
        return have.copy()

    def close(self) -> None:
        """Flush, then release the file; safe against a concurrent :meth:`flush`.

        Waits for writes under way first: the second copy of an end-game piece returns "not
        new" while the first is still being written, so the job may close as soon as that
        answer comes; the piece must still be made present."""
        with self._flush_lock:
            if self._fd < 0:
                return
            with self._lock:
                self._written.wait_for(lambda: not self._writing)
                self._closing = True  # no write may start on a descriptor being closed
            try:
                pending = self._sync()
                if pending:
                    self._settle(pending, self._db.merge_pieces([(self.blob_id,
                                                                   sorted(pending))])[0])
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> PartialBlob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def flush_many(db: MetaDB, partials: Iterable[PartialBlob]) -> list[Bitfield]:
    """Flush many writers at once: each one's data is made durable, then one transaction
    marks every written piece present.  The present sets, in the order given."""
    given = list(partials)
    ordered = sorted(set(given), key=id)  # one lock order, whoever flushes what
    with ExitStack() as locks:
        for p in ordered:
            locks.enter_context(p._flush_lock)
        pending = {p: p._sync() if p._fd >= 0 else set() for p in ordered}
        todo = [p for p in ordered if pending[p]]
        haves = db.merge_pieces([(p.blob_id, sorted(pending[p])) for p in todo]) \
            if todo else []
        done = {p: p._settle(pending[p], have) for p, have in zip(todo, haves, strict=True)}
        for p in ordered:
            if p not in done:  # nothing of ours to add: see what other writers added
                done[p] = p._settle(set(), db.bitfield(p.blob_id))
    return [done[p] for p in given]


__all__ = ["PartialBlob", "VerificationError", "flush_many"]
