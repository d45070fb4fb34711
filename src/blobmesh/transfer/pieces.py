"""Piece I/O for channels: reading pieces to send, writing received ones."""

from __future__ import annotations

import os
import threading

from blobmesh.errors import (
    BlobIncompleteError,
    CorruptBlobError,
    StoreFullError,
    VerificationError,
)
from blobmesh.hashing import PieceLayer
from blobmesh.store import Bitfield, PartialBlob, Store
from blobmesh.store.partial import FLUSH_BYTES


class PieceReader:
    """Reads one blob's pieces for a sender, verified against the layer.

    Unlike ``Store.read_piece`` it opens the data file and queries the bitfield once per
    channel instead of once per piece (that per-piece cost bounded a GiB pull); the bitfield is
    re-read only when a piece is not known to be present yet, as a partial blob grows.  An open
    descriptor keeps reading the same file even if GC moves it away meanwhile.  A lock makes
    :meth:`close` wait for a read still running in a thread whose task was cancelled.
    """

    def __init__(self, store: Store, layer: PieceLayer, *, verify: bool) -> None:
        self._store = store
        self._layer = layer
        self._verify = verify
        self._have = store.bitfield(layer.blob_id)
        self._lock = threading.Lock()
        self._fd = os.open(store.layout.data_path(layer.blob_id), os.O_RDONLY)

    def read(self, index: int) -> bytes:
        """Piece ``index``; BlobIncompleteError if it is not here, CorruptBlobError if the
        disk no longer holds what was verified."""
        blob_id = self._layer.blob_id
        if index not in self._have:
            self._have = self._store.bitfield(blob_id)
            if index not in self._have:
                raise BlobIncompleteError(f"piece {index} of {blob_id} is not here",
                                          blob_id=blob_id, piece=index)
        start, length = self._layer.piece_range(index)
        with self._lock:
            if self._fd < 0:
                raise BlobIncompleteError(f"reader of {blob_id} is closed", blob_id=blob_id)
            data = os.pread(self._fd, length, start)
        if self._verify and not self._layer.check_piece(index, data):
            raise CorruptBlobError(f"piece {index} of {blob_id} is corrupt on disk; run fsck",
                                   blob_id=blob_id, piece=index)
        return data

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class PieceSink:
    """Writes received pieces into a partial blob from worker threads, and flushes them.

    Writes and flushes take different locks, so one batch's fdatasync overlaps the next
    batch's hashing and writing.  :meth:`close` takes both: a worker thread still running
    after its task was cancelled finishes before the blob's descriptor is closed, and none
    starts after.  ``PartialBlob.flush`` is not safe against a concurrent flush (two flushes
    of one pending piece raise KeyError), so a write that may trigger the partial blob's own
    automatic flush also holds the flush lock.
    """

    def __init__(self, partial: PartialBlob) -> None:
        self.partial = partial
        self._write_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._unflushed = 0
        self._closed = False

    def write(self, batch: list[tuple[int, bytes]]) -> tuple[list[int], tuple[int, str] | None]:
        """Verify and write pieces; stops at the first bad one (returned with the reason).
        Raises StoreFullError when the disk is full."""
        size = sum(len(d) for _, d in batch)
        with self._write_lock:
            if self._unflushed + size >= FLUSH_BYTES:
                with self._flush_lock:
                    return self._write(batch, size)
            return self._write(batch, size)

    def _write(self, batch: list[tuple[int, bytes]], size: int
               ) -> tuple[list[int], tuple[int, str] | None]:
        written: list[int] = []
        if self._closed:
            return written, None
        self._unflushed += size
        for index, data in batch:
            try:
                self.partial.write_piece(index, data)
            except StoreFullError:
                raise
            except VerificationError as exc:
                return written, (index, str(exc))
            written.append(index)
        return written, None

    def flush(self) -> Bitfield:
        """Make written pieces durable and present; returns the present set."""
        with self._flush_lock:
            if self._closed:
                return Bitfield(len(self.partial.layer))
            self._unflushed = 0
            return self.partial.flush()

    def close(self) -> None:
        """Flush and close (waiting for any write or flush still running in a thread)."""
        with self._write_lock, self._flush_lock:
            if not self._closed:
                self._closed = True
                self.partial.close()
