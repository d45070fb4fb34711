"""Reading blobs: seekable verified readers, single pieces and piece layers."""

from __future__ import annotations

import io
import os
import sqlite3
import time
from contextlib import suppress
from typing import TYPE_CHECKING

from blobmesh.errors import BlobIncompleteError, CorruptBlobError, VerificationError
from blobmesh.hashing import BlobId, PieceLayer, hash_bytes, hash_piece, piece_count
from blobmesh.store.db import MetaDB, add_lease, inline_content, require_complete
from blobmesh.store.ingest import CHUNK
from blobmesh.store.layout import Layout, file_key
from blobmesh.store.leases import LeaseId
from blobmesh.types import Bitfield

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


def piece_layer(db: MetaDB, layout: Layout, blob_id: BlobId) -> PieceLayer:
    """The stored piece layer (from ``layers`` or its file), checked against the blob id."""
    size, piece_size, raw = db.layer_row(blob_id)
    if raw is None:  # not in the database: in its file
        try:
            raw = layout.pieces_path(blob_id).read_bytes()
        except FileNotFoundError as exc:
            raise CorruptBlobError(f"piece layer of {blob_id} is missing; run fsck",
                                   blob_id=blob_id) from exc
    try:
        return PieceLayer.from_bytes(blob_id, size, piece_size, raw)
    except VerificationError as exc:
        raise CorruptBlobError(f"piece layer of {blob_id} is corrupt; run fsck",
                               blob_id=blob_id) from exc


def open_reader(db: MetaDB, layout: Layout, blob_id: BlobId, lease: LeaseId | None, *,
                verify: bool) -> BlobReader:
    """A reader over a complete blob, holding a lease of its own (and recording ``lease``)."""
    hold = LeaseId.new(f"reader[{lease.consumer if lease else 'once'}]")
    with db.write() as conn:
        size = require_complete(conn, blob_id)
        if lease is not None:
            add_lease(conn, blob_id, lease)
        add_lease(conn, blob_id, hold)
        data = inline_content(conn, blob_id)  # kept inline: no file
    try:
        layer = piece_layer(db, layout, blob_id) if verify else None
        fd = -1 if data is not None else os.open(layout.data_path(blob_id), os.O_RDONLY)
    except FileNotFoundError as exc:
        db.drop_lease(hold, blob_id)
        raise CorruptBlobError(f"data file of {blob_id} is missing; run fsck",
                               blob_id=blob_id) from exc
    except BaseException:
        db.drop_lease(hold, blob_id)
        raise
    return BlobReader(db, blob_id, fd, size, layer, hold, data)


def read_piece(db: MetaDB, layout: Layout, blob_id: BlobId, index: int, *,
               verify: bool) -> bytes:
    """One present piece (also of a partial blob)."""
    row = db.blob_row(blob_id)
    size, piece_size = int(row[1]), int(row[2])
    if index not in Bitfield(piece_count(size, piece_size), bytes(row[4])):
        raise BlobIncompleteError(f"piece {index} of {blob_id} is not present",
                                  blob_id=blob_id, piece=index)
    start = index * piece_size
    length = max(0, min(piece_size, size - start))
    inline = db.content(blob_id)
    if inline is not None:
        data = inline[start : start + length]
    else:
        try:
            data = _pread_file(layout, blob_id, length, start)
        except CorruptBlobError:
            db.blob_row(blob_id)  # collected meanwhile: BlobNotFoundError, not corruption
            raise
    if verify:
        layer = piece_layer(db, layout, blob_id)
        if len(data) != length or hash_piece(data) != layer.hashes[index]:
            raise CorruptBlobError(f"piece {index} of {blob_id} is corrupt on disk",
                                   blob_id=blob_id, piece=index)
    return data


def _pread_file(layout: Layout, blob_id: BlobId, length: int, offset: int) -> bytes:
    try:
        fd = os.open(layout.data_path(blob_id), os.O_RDONLY)
    except FileNotFoundError as exc:
        raise CorruptBlobError(f"data file of {blob_id} is missing; run fsck",
                               blob_id=blob_id) from exc
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def read_whole(db: MetaDB, layout: Layout, blob_id: BlobId, size: int, *, verify: bool
               ) -> bytes:
    """The content of a complete (small) blob of known ``size``, read without a lease (as a
    sender's ``PieceReader`` does); CorruptBlobError if its file is missing or, with
    ``verify``, does not hash to the id."""
    data = db.content(blob_id)
    if data is None:
        data = _pread_file(layout, blob_id, size, 0)
    if len(data) != size or (verify and hash_bytes(data) != blob_id):
        raise CorruptBlobError(f"{blob_id} is corrupt on disk; run fsck", blob_id=blob_id)
    return data


def verify_complete(db: MetaDB, layout: Layout, blob_id: BlobId, lease: LeaseId | None, *,
                    max_age: float) -> bool:
    """Check that a complete blob still matches its id; CorruptBlobError if it does not.

    The full rehash is skipped when the last one recorded in the store is younger than
    ``max_age`` seconds and was of the same data file: same device, inode, size, modification
    and change time (writing to the file or replacing it changes them, and the change time
    cannot be set back).  Rot that leaves all of them alone is caught by the next full check
    and by every verified read of a piece (senders verify what they send).  Data kept inline
    is always rehashed (it is small).  ``lease`` is recorded as by :func:`open_reader`.  True
    when it rehashed.
    """
    with open_reader(db, layout, blob_id, lease, verify=True) as reader:
        key = reader.file_key()
        last = db.verified(blob_id)
        if key is not None and last is not None and last[0] == key and \
                0 <= time.time() - last[1] < max_age:
            return False
        started = time.time()
        try:
            reader.verify_all()
        except CorruptBlobError:
            db.forget_verified(blob_id)
            raise
        if key is not None and reader.file_key() == key:  # not changed while we read it
            db.set_verified(blob_id, key, started)
    return True


class BlobReader(io.RawIOBase):
    """A seekable, read-only binary file over one complete blob.

    It holds a lease of its own until closed, so the blob cannot be collected under it.  With
    verification on, each piece is checked against the blob id the first time it is read.
    """

    def __init__(self, db: MetaDB, blob_id: BlobId, fd: int, size: int,
                 layer: PieceLayer | None, hold: LeaseId, data: bytes | None = None) -> None:
        super().__init__()
        self.blob_id = blob_id
        self.size = size
        self._db = db
        self._fd = fd
        self._pos = 0
        self._layer = layer
        self._verified: set[int] = set()
        self._hold = hold
        self._data = data  # a blob kept inline (then there is no file: fd is -1)

    def _pread(self, length: int, offset: int) -> bytes:
        if self._data is not None:
            return self._data[offset : offset + length]
        return os.pread(self._fd, length, offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        if self.closed:
            raise ValueError("read from a closed BlobReader")
        out = memoryview(buffer).cast("B")
        n = max(0, min(len(out), self.size - self._pos))
        if n == 0:
            return 0
        if self._layer is not None:
            self._verify_span(self._pos, n)
        if self._data is not None:
            out[:n] = self._data[self._pos : self._pos + n]
            got = n
        else:  # straight into the caller's buffer
            got = os.preadv(self._fd, [out[:n]], self._pos)
        if got != n:
            raise CorruptBlobError(f"blob {self.blob_id} is truncated on disk; run fsck",
                                   blob_id=self.blob_id)
        self._pos += n
        return n

    def readall(self) -> bytes:
        out = bytearray()
        while chunk := self.read(CHUNK):
            out += chunk
        return bytes(out)

    def file_key(self) -> str | None:
        """The ``layout.file_key`` of the data file read; None for data kept inline."""
        if self._fd < 0:
            return None
        return file_key(os.fstat(self._fd))

    def verify_all(self) -> None:
        """Check every piece not checked yet (each read once); needs verification on."""
        if self.size:
            self._verify_span(0, self.size)

    def _verify_span(self, start: int, length: int) -> None:
        layer = self._layer
        assert layer is not None
        first, last = start // layer.piece_size, (start + length - 1) // layer.piece_size
        for i in range(first, last + 1):
            if i in self._verified:
                continue
            off, plen = layer.piece_range(i)
            data = self._pread(plen, off)
            if len(data) != plen or hash_piece(data) != layer.hashes[i]:
                raise CorruptBlobError(
                    f"blob {self.blob_id} is corrupt on disk (piece {i}); run fsck",
                    blob_id=self.blob_id, piece=i)
            self._verified.add(i)

    def close(self) -> None:
        if not self.closed:
            try:
                if self._fd >= 0:
                    os.close(self._fd)
                with suppress(sqlite3.ProgrammingError):  # the store closed first
                    self._db.drop_lease(self._hold, self.blob_id)
            finally:
                super().close()
