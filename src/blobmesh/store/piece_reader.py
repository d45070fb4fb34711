"""Reading a blob's pieces many times over (senders), verified, without per-piece setup."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from blobmesh.errors import BlobIncompleteError, CorruptBlobError
from blobmesh.hashing import PieceLayer

if TYPE_CHECKING:
    from blobmesh.store.store import Store


class PieceReader:
    """Reads one blob's pieces for a sender, verified against the layer.

    Unlike ``Store.read_piece`` it opens the data file and queries the bitfield once per
    reader instead of once per piece (that per-piece cost bounded a GiB pull); the bitfield is
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
        self._inline = store.db.content(layer.blob_id)  # a small blob kept in the database
        self._fd = -1 if self._inline is not None else \
            os.open(store.layout.data_path(layer.blob_id), os.O_RDONLY)
        self._closed = False

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
            if self._closed:
                raise BlobIncompleteError(f"reader of {blob_id} is closed", blob_id=blob_id)
            data = self._inline[start : start + length] if self._inline is not None else \
                os.pread(self._fd, length, start)
        if self._verify and not self._layer.check_piece(index, data):
            raise CorruptBlobError(f"piece {index} of {blob_id} is corrupt on disk; run fsck",
                                   blob_id=blob_id, piece=index)
        return data

    def read_many(self, indices: list[int]) -> list[bytes]:
        """:meth:`read` of each piece, in order (one call for a sender's read-ahead)."""
        return [self.read(i) for i in indices]

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._closed = True
