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
    """Writes received pieces into a partial blob from worker threads.

    Writes run in one thread at a time while flushes (``PartialBlob.flush``, safe to call
    concurrently) run in another, so one batch's fdatasync overlaps the next batch's hashing
    and writing.  :meth:`close` waits for a write still running in a thread whose task was
    cancelled, and no write starts after it: the blob's descriptor is never used once closed.
    """

    def __init__(self, partial: PartialBlob) -> None:
        self.partial = partial
        self._write_lock = threading.Lock()
        self._closed = False

    def write(self, batch: list[tuple[int, bytes]]) -> tuple[list[int], tuple[int, str] | None]:
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

    def flush(self) -> Bitfield:
        """Make written pieces durable and present; returns the present set."""
        if self._closed:
            return Bitfield(len(self.partial.layer))
        return self.partial.flush()

    def close(self) -> None:
        """Flush and close (after any write still running in a thread)."""
        with self._write_lock:
            if not self._closed:
                self._closed = True
                self.partial.close()
