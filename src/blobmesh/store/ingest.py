"""Getting data into the store: adds (one blob or many in one commit) and new partial blobs.

An add streams its input into ``tmp/add-PID-*.tmp`` while hashing it, fsyncs it and its piece
layer, then — inside one write transaction — renames both into ``blobs/`` and inserts the row.
A :class:`Batch` commits any number of adds in one transaction: one write-lock acquisition and
one SQLite commit (one WAL fsync), and its files are made durable in one ``syncfs`` round
before the moves and one after (instead of an fsync per file and directory), whatever the
count.
"""

from __future__ import annotations

import ctypes
import io
import itertools
import os
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from blobmesh.errors import SourceError, StoreError
from blobmesh.hashing import BlobId, PieceLayer, TreeHasher, piece_count
from blobmesh.store.db import MetaDB, Undo, add_lease, has_row
from blobmesh.store.layout import (
    DIR_MODE,
    FULL_ERRNOS,
    Layout,
    create_file,
    fsync_dir,
    write_file_synced,
)
from blobmesh.store.leases import LeaseId
from blobmesh.store.types import BlobInfo, Progress
from blobmesh.types import Bitfield

CHUNK = 16 * 1024 * 1024
"""Large reads and writes; hashing overlaps each in a thread."""
OVERLAP_MIN = 1024 * 1024
"""Below this, hashing a chunk in a helper thread costs more than it overlaps."""

Bytes = bytes | bytearray | memoryview
Source = BinaryIO | io.RawIOBase | Iterable[Bytes]


class Ingest:
    """A temp file being written and hashed for an add (``tmp/add-PID-*.tmp``)."""

    def __init__(self, layout: Layout) -> None:
        self.path = layout.tmp / f"add-{os.getpid()}-{uuid.uuid4().hex}.tmp"
        self.pieces_path = self.path.with_suffix(".pieces")
        self.layer: PieceLayer | None = None
        self._fd: int | None = create_file(self.path)
        self._hasher = TreeHasher()
        self._pool: ThreadPoolExecutor | None = None
        self._hashing: Future[None] | None = None

    def feed(self, source: Source, progress: Progress | None = None) -> None:
        """Write all of ``source`` (a binary file object or an iterable of byte chunks)."""
        # chunks read from a file object alternate between two buffers of ours, so one may
        # still be hashed while the next is read; a caller's chunks are done with at once
        keep = hasattr(source, "read")
        for chunk in chunks(source):
            self.write(chunk, keep=keep)
            if progress:
                progress(len(chunk))

    def write(self, chunk: Bytes, *, keep: bool = False) -> None:
        """Hash and write ``chunk``.

        Large chunks are hashed in a helper thread while this one writes (blake3 releases the
        GIL).  With ``keep`` the caller leaves ``chunk`` unchanged until the next call, so its
        hashing may go on after this returns, overlapping the caller's next read.
        """
        assert self._fd is not None
        self._wait_hashed()
        mv = memoryview(chunk).cast("B")
        if len(mv) < OVERLAP_MIN:
            self._hasher.update(mv)
            self._write_all(mv)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="blobmesh-hash")
        self._hashing = self._pool.submit(self._hasher.update, mv)
        try:
            self._write_all(mv)
        finally:
            if not keep:
                self._wait_hashed()

    def _wait_hashed(self) -> None:
        hashing, self._hashing = self._hashing, None
        if hashing is not None:
            hashing.result()

    def _write_all(self, mv: memoryview) -> None:
        assert self._fd is not None
        while mv:
            mv = mv[os.write(self._fd, mv):]

    def finish(self) -> PieceLayer:
        """Close the data and write its piece layer beside it; the blob's layer.  Neither is
        durable yet: :meth:`Batch.commit` syncs every file of the batch at once."""
        assert self._fd is not None
        self._wait_hashed()
        os.close(self._fd)
        self._fd = None
        _, self.layer = self._hasher.finalize()
        fd = create_file(self.pieces_path)
        try:
            mv = memoryview(self.layer.to_bytes())
            while mv:
                mv = mv[os.write(fd, mv):]
        finally:
            os.close(fd)
        return self.layer

    def discard(self) -> None:
        """Close and remove everything this add left in ``tmp/`` (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._fd is not None:
            with suppress(OSError):
                os.close(self._fd)
            self._fd = None
        for path in (self.path, self.pieces_path, self.path.with_suffix(".moving")):
            path.unlink(missing_ok=True)


class Batch:
    """Adds that commit together: ``with Batch(layout) as b: b.add(...); b.commit(db, lease)``.

    Leaving the block removes every temp file; an ``OSError`` leaves it as a
    :class:`StoreError` (:class:`~blobmesh.errors.StoreFullError` on a full disk).
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._ingests: list[Ingest] = []

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for ing in self._ingests:
            ing.discard()
        if isinstance(exc, OSError) and not isinstance(exc, StoreError):
            if exc.errno in FULL_ERRNOS:
                raise self.layout.disk_full("adding to") from exc
            raise StoreError(f"add failed: {exc}", home=str(self.layout.home)) from exc

    def new(self) -> Ingest:
        """A new temp file of this batch, to be written and finished by the caller."""
        ing = Ingest(self.layout)
        self._ingests.append(ing)
        return ing

    def add(self, source: Source | Bytes, progress: Progress | None = None) -> PieceLayer:
        """Write and hash one input into ``tmp/`` and make it durable there."""
        ing = self.new()
        if isinstance(source, bytes | bytearray | memoryview):
            mv = memoryview(source)
            source = (mv[i : i + CHUNK] for i in range(0, len(mv), CHUNK))
        ing.feed(source, progress)
        return ing.finish()

    def commit(self, db: MetaDB, lease: LeaseId | None) -> list[BlobInfo]:
        """Move every added blob into ``blobs/`` and insert its row in one transaction; a blob
        already complete here is only leased.  Their infos, in the order added."""
        sync_files(self.layout, [p for ing in self._ingests
                                 for p in (ing.path, ing.pieces_path)])
        now = time.time()
        undo: Undo = []
        dirs: set[Path] = set()
        with db.write(undo) as conn:
            for ing in self._ingests:
                layer = ing.layer
                assert layer is not None
                blob_id = layer.blob_id
                row = conn.execute("SELECT complete, piece_size FROM blobs WHERE id=?",
                                   (blob_id.digest,)).fetchone()
                if row is None:
                    conn.execute("INSERT INTO blobs VALUES (?,?,?,1,?,?,?)",
                                 (blob_id.digest, layer.size, layer.piece_size,
                                  Bitfield.full(len(layer)).to_bytes(), now, now))
                    dirs.add(move_in(self.layout, blob_id, ing.path, ing.pieces_path, undo))
                elif not row[0]:
                    # A partial copy is here: the complete data serves it at its own piece
                    # size, so its piece layer (which readers and writers already use) stays.
                    conn.execute("UPDATE blobs SET complete=1, have=?, updated=? WHERE id=?",
                                 (Bitfield.full(piece_count(layer.size, row[1])).to_bytes(),
                                  now, blob_id.digest))
                    dirs.add(move_in(self.layout, blob_id, ing.path, None, undo))
                if lease is not None:
                    add_lease(conn, blob_id, lease)
            sync_dirs(self.layout, dirs)  # the renames are durable before the rows are
            return db.infos([ing.layer.blob_id for ing in self._ingests if ing.layer])


def create_partial(db: MetaDB, layout: Layout, layer: PieceLayer, lease: LeaseId) -> None:
    """Create the sparse data file, piece layer and row of a new partial blob (nothing if the
    blob is already here, partial or complete) and lease it."""
    blob_id = layer.blob_id
    tmp = layout.tmp / f"partial-{os.getpid()}-{uuid.uuid4().hex}.tmp"
    undo: Undo = []
    try:
        with layout.full_disk("creating a partial blob in"), db.write(undo) as conn:
            if not has_row(conn, blob_id):
                fd = create_file(tmp)
                try:
                    os.ftruncate(fd, layer.size)  # sparse: pieces fill it in any order
                    os.fsync(fd)
                finally:
                    os.close(fd)
                write_file_synced(tmp.with_suffix(".pieces"), layer.to_bytes())
                now = time.time()
                conn.execute("INSERT INTO blobs VALUES (?,?,?,0,?,?,?)",
                             (blob_id.digest, layer.size, layer.piece_size,
                              Bitfield(len(layer)).to_bytes(), now, now))
                fsync_dir(move_in(layout, blob_id, tmp, tmp.with_suffix(".pieces"), undo))
            add_lease(conn, blob_id, lease)
    finally:
        for leftover in (tmp, tmp.with_suffix(".pieces"), tmp.with_suffix(".moving")):
            leftover.unlink(missing_ok=True)


def move_in(layout: Layout, blob_id: BlobId, data_tmp: Path, pieces_tmp: Path | None,
            undo: Undo) -> Path:
    """Rename finished files into ``blobs/`` inside the transaction that writes the row;
    returns the directory to fsync before that transaction commits.

    Without ``pieces_tmp`` the data replaces a partial blob's file and stays even if the
    transaction aborts (it is valid for the partial row too); otherwise an abort removes
    the files.  A marker in ``tmp/`` names the blob until the caller is done, so if this
    process dies before its commit the next open removes files that never got a row.
    """
    data_path = layout.data_path(blob_id)
    marker = data_tmp.with_suffix(".moving")
    marker.write_text(blob_id.hex)
    undo.append(partial(marker.unlink, missing_ok=True))
    data_path.parent.mkdir(DIR_MODE, exist_ok=True)
    if pieces_tmp is not None:
        pieces_path = layout.pieces_path(blob_id)
        os.replace(pieces_tmp, pieces_path)
        undo.append(partial(pieces_path.unlink, missing_ok=True))
        os.replace(data_tmp, data_path)
        undo.append(partial(data_path.unlink, missing_ok=True))
    else:
        os.replace(data_tmp, data_path)
    return data_path.parent


SYNCFS_MIN = 3
"""From this many files (or directories) on, one ``syncfs`` beats an fsync each."""
_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)


def sync_files(layout: Layout, paths: Sequence[Path]) -> None:
    """Make these files' data durable: an fsync each, or for many one ``syncfs`` of the
    home's filesystem (one journal commit however many files; Linux)."""
    if len(paths) >= SYNCFS_MIN and _sync_filesystem(layout.tmp):
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sync_dirs(layout: Layout, dirs: Collection[Path]) -> None:
    """Make renames into these directories durable (as :func:`sync_files`)."""
    if len(dirs) >= SYNCFS_MIN and _sync_filesystem(layout.blobs):
        return
    for d in dirs:
        fsync_dir(d)


def _sync_filesystem(path: Path) -> bool:
    """``syncfs`` the filesystem holding ``path``; False where there is no ``syncfs``."""
    if _syncfs is None:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)
    return True


def open_source(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a file to add, with a one-line :class:`SourceError` when that fails."""
    p = Path(path)
    try:
        return open(p, "rb")
    except FileNotFoundError as exc:
        raise SourceError(f"no such file: {p}", path=str(p)) from exc
    except IsADirectoryError as exc:
        raise SourceError(f"is a directory: {p}", path=str(p)) from exc
    except PermissionError as exc:
        raise SourceError(f"permission denied: {p}", path=str(p)) from exc
    except OSError as exc:
        raise SourceError(f"cannot read {p}: {exc.strerror}", path=str(p)) from exc


def chunks(source: Source) -> Iterator[Bytes]:
    """The input in chunks.

    A file object is read into two buffers in turn (no allocation and page faults per chunk):
    a chunk stays valid until the one after the next is asked for.
    """
    stream: Any = source
    if not hasattr(stream, "read"):
        yield from source
        return
    size = CHUNK if hasattr(stream, "readinto") else 0
    buffers = (bytearray(size), bytearray(size))
    for i in itertools.count():
        buf = buffers[i % 2]
        try:
            chunk = memoryview(buf)[: stream.readinto(buf) or 0] if size else stream.read(CHUNK)
        except OSError as exc:
            raise SourceError(f"reading the input failed: {exc.strerror or exc}") from exc
        if not chunk:
            return
        yield chunk

