"""Writing a blob piece by piece, in any order, from any number of sources."""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING

from blobmesh.errors import BlobIncompleteError, StoreFullError, VerificationError
from blobmesh.hashing import BlobId, Buffer, PieceLayer
from blobmesh.store.bitfield import Bitfield
from blobmesh.store.leases import LeaseId

if TYPE_CHECKING:
    from blobmesh.store.store import Store

FLUSH_BYTES = 32 * 1024 * 1024


class PartialBlob:
    """A writer for one partial blob.

    Every piece is verified against the piece layer before it is written.  Written pieces
    become *present* (visible to readers and to other processes) at :meth:`flush`, after the
    data is durable, so a crash never marks a piece present whose bytes are not on disk.
    Flushing happens by itself every 32 MiB and on :meth:`close`.
    """

    def __init__(self, store: Store, layer: PieceLayer, lease: LeaseId) -> None:
        self.layer = layer
        self.lease = lease
        self._store = store
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush (or close) at a time
        # read-write: pieces written but not yet flushed can already be served to peers
        self._fd = os.open(store.layout.data_path(layer.blob_id), os.O_RDWR)
        self._pending: dict[int, int] = {}  # written, not yet durable: index -> length
        self._have = store.bitfield(layer.blob_id)

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
            if index in self._have or index in self._pending:
                return False
        start, _ = self.layer.piece_range(index)
        try:
            mv = memoryview(data)
            off = start
            while mv:
                n = os.pwrite(self._fd, mv, off)
                mv, off = mv[n:], off + n
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFullError(f"disk full writing {self.blob_id.short()}",
                                     blob_id=self.blob_id) from exc
            raise
        with self._lock:
            self._pending[index] = len(data)
            due = sum(self._pending.values()) >= FLUSH_BYTES
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
        with self._flush_lock:
            return self._flush()

    def _flush(self) -> Bitfield:
        with self._lock:
            pending = set(self._pending)
        if pending:
            os.fdatasync(self._fd)
            self._have = self._store._merge_pieces(self.blob_id, pending)
            with self._lock:
                for index in pending:  # pieces written meanwhile stay pending
                    del self._pending[index]
        else:
            self._have = self._store.bitfield(self.blob_id)
        return self._have.copy()

    def close(self) -> None:
        """Flush, then release the file; safe against a concurrent :meth:`flush`."""
        with self._flush_lock:
            if self._fd < 0:
                return
            try:
                self._flush()
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> PartialBlob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["PartialBlob", "VerificationError"]
