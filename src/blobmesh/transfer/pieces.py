"""Piece I/O for channels: writing received pieces (reading is ``store.PieceReader``)."""

from __future__ import annotations

import threading

from blobmesh.errors import StoreFullError, VerificationError
from blobmesh.hashing import Buffer
from blobmesh.store import PartialBlob


class PieceSink:
    """Writes received pieces into a partial blob from worker threads.

    Writes run in one thread at a time while flushes (``AsyncStore.flush``, safe to call
    concurrently) run in another, so one batch's fdatasync overlaps the next batch's hashing
    and writing.  :meth:`close` waits for a write still running in a thread whose task was
    cancelled, and no write starts after it: the blob's descriptor is never used once closed.
    """

    def __init__(self, partial: PartialBlob) -> None:
        self.partial = partial
        self._write_lock = threading.Lock()
        self._closed = False

    def write(self, batch: list[tuple[int, Buffer]]) -> tuple[list[int], tuple[int, str] | None]:
        """Verify and write pieces; stops at the first bad one (returned with the reason).
        Raises StoreFullError when the disk is full."""
        written: list[int] = []
        with self._write_lock:
            if self._closed:
                return written, None
            for index, data in batch:
                try:
                    self.partial.write_piece(index, data)
                except StoreFullError:
                    raise
                except VerificationError as exc:
                    return written, (index, str(exc))
                written.append(index)
        return written, None

    def close(self) -> None:
        """Flush and close (after any write still running in a thread)."""
        with self._write_lock:
            if not self._closed:
                self._closed = True
                self.partial.close()
