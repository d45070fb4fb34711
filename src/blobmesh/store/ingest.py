"""Getting data into the store: adds (one blob or many in one commit) and new partial blobs.

A streamed add goes into ``tmp/add-PID-*.tmp`` while being hashed; its piece layer is written
beside it.  Content of at most ``HELD_MAX`` bytes given in memory is only hashed: nothing is
written for it until the commit, and nothing at all if its blob is already here.

A :class:`Batch` commits any number of adds in one write transaction (one write-lock
acquisition, one SQLite commit).  Inside it, one *journal* in ``tmp/`` names every blob about to
appear; then staged files are renamed into ``blobs/`` and held contents are written there in
place (their data file only: their piece layers go into the database's ``layers`` table, so a
small blob costs one file create); one sync makes all of it durable before the rows commit.
Staged files are synced before the transaction (so a big add does not flush gigabytes holding
the lock).  A sync of three files or more is one ``syncfs`` of the home's filesystem instead of
an fsync each, so a batch of small blobs costs one ``syncfs`` and one commit however many there
are.  If the process dies before its commit, the next open (``gc.recover``) removes the files of
every blob the journal names that has no row: the batch appears whole or not at all.
"""

from __future__ import annotations

import ctypes
import io
import itertools
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from blobmesh.errors import SourceError, StoreError
from blobmesh.hashing import BlobId, PieceLayer, TreeHasher, hash_stream, piece_count
from blobmesh.store.db import (
    MetaDB,
    Undo,
    add_lease,
    has_row,
    id_batches,
    inline_content,
    record_verified,
)
from blobmesh.store.layout import (
    DIR_MODE,
    FULL_ERRNOS,
    Bytes,
    Layout,
    create_file,
    file_key,
    write_file,
)
from blobmesh.store.leases import LeaseId
from blobmesh.store.types import BlobInfo, Progress
from blobmesh.types import Bitfield

CHUNK = 16 * 1024 * 1024
"""Large reads and writes; hashing overlaps each in a thread."""
OVERLAP_MIN = 1024 * 1024
"""Below this, hashing a chunk in a helper thread costs more than it overlaps."""
HELD_MAX = 1024 * 1024
"""In-memory content up to this size is written straight into ``blobs/`` at the commit (no temp
file, rename or unlink); larger content is staged in ``tmp/`` like a stream."""

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
        for path in (self.path, self.pieces_path):
            path.unlink(missing_ok=True)


class Held:
    """Content given in memory and hashed; written (if its blob is missing) at the commit.
    The caller leaves ``data`` unchanged until then."""

    __slots__ = ("data", "layer")

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.layer = hash_stream([data])[1]


class Batch:
    """Adds that commit together: ``with Batch(layout) as b: b.add(...); b.commit(db, lease)``.

    With ``inline``, held contents are kept in the database (``contents``) instead of a file
    each: many small blobs then cost no file create at all.

    Leaving the block removes every temp file and the journal; an ``OSError`` leaves it as a
    :class:`StoreError` (:class:`~blobmesh.errors.StoreFullError` on a full disk).
    """

    def __init__(self, layout: Layout, *, inline: bool = False) -> None:
        self.layout = layout
        self.inline = inline
        self._items: list[Ingest | Held] = []
        self._journal: Path | None = None

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for item in self._items:
            if isinstance(item, Ingest):
                item.discard()
        if self._journal is not None:
            self._journal.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, StoreError):
            if exc.errno in FULL_ERRNOS:
                raise self.layout.disk_full("adding to") from exc
            raise StoreError(f"add failed: {exc}", home=str(self.layout.home)) from exc

    def new(self) -> Ingest:
        """A new temp file of this batch, to be written and finished by the caller."""
        ing = Ingest(self.layout)
        self._items.append(ing)
        return ing

    def add(self, source: Source | Bytes, progress: Progress | None = None) -> PieceLayer:
        """Hash one input; stage it in ``tmp/`` unless it is small content in memory (which
        must stay unchanged until the commit)."""
        if isinstance(source, bytes | bytearray | memoryview):
            mv = memoryview(source).cast("B")
            if len(mv) <= HELD_MAX:
                held = Held(mv)
                self._items.append(held)
                if progress:
                    progress(len(mv))
                return held.layer
            source = (mv[i : i + CHUNK] for i in range(0, len(mv), CHUNK))
        ing = self.new()
        ing.feed(source, progress)
        return ing.finish()

    def commit(self, db: MetaDB, lease: LeaseId | None) -> list[BlobInfo]:
        """Put every blob not complete here yet into ``blobs/`` and insert (or complete) its
        row, all in one transaction; a blob already complete here is only leased (and costs no
        write).  Their infos, in the order added."""
        staged = [item for item in self._items if isinstance(item, Ingest)]
        if staged:
            sync_paths(self.layout, [p for ing in staged for p in (ing.path, ing.pieces_path)])
        layers = [_layer(item) for item in self._items]
        now = time.time()
        undo: Undo = []
        with db.write(undo) as conn:
            rows = _rows(conn, [layer.blob_id for layer in layers])
            todo: list[tuple[Ingest | Held, int | None]] = []  # a partial's piece size, if any
            for item, layer in zip(self._items, layers, strict=True):
                row = rows.get(layer.blob_id.digest)
                if row is None or not row[0]:
                    todo.append((item, None if row is None else row[1]))
                    rows[layer.blob_id.digest] = (1, layer.piece_size)  # a repeat: only leased
            # the database holds the layer (and, inline, the data) of held content of a blob
            # that was not here as a partial
            held = [item for item, partial_size in todo
                    if isinstance(item, Held) and partial_size is None]
            files = [(item, partial_size) for item, partial_size in todo
                     if not (self.inline and isinstance(item, Held) and partial_size is None)]
            if files:
                self._journal = write_journal(self.layout,
                                              [_layer(i).blob_id for i, _ in files], undo)
            durable = self._place(files, undo)
            # hashed as they were written: verified, for as long as the files stay as placed
            ids = [_layer(item).blob_id for item, _ in files]
            record_verified(conn, [(b, file_key(os.stat(self.layout.data_path(b))))
                                   for b in ids], now)
            placed = [(_layer(item), partial_size) for item, partial_size in todo]
            conn.executemany("INSERT INTO blobs VALUES (?,?,?,1,?,?,?)", [
                (layer.blob_id.digest, layer.size, layer.piece_size,
                 Bitfield.full(len(layer)).to_bytes(), now, now)
                for layer, partial_size in placed if partial_size is None])
            # a partial copy was here: the complete data serves it at its own piece size, so
            # its piece layer (which readers and writers already use) stays
            conn.executemany("UPDATE blobs SET complete=1, have=?, updated=? WHERE id=?", [
                (Bitfield.full(piece_count(layer.size, partial_size)).to_bytes(), now,
                 layer.blob_id.digest)
                for layer, partial_size in placed if partial_size is not None])
            conn.executemany("INSERT OR REPLACE INTO layers VALUES (?,?)", [
                (_layer(item).blob_id.digest, _layer(item).to_bytes()) for item in held])
            if self.inline:
                conn.executemany("INSERT OR REPLACE INTO contents VALUES (?,?)", [
                    (_layer(item).blob_id.digest, item.data) for item in held])
            if lease is not None:
                for layer in layers:
                    add_lease(conn, layer.blob_id, lease)
            if durable:
                sync_paths(self.layout, durable)  # the files are durable before the rows are
            return db.infos([layer.blob_id for layer in layers])

    def _place(self, todo: list[tuple[Ingest | Held, int | None]], undo: Undo) -> list[Path]:
        """Rename or write the files of ``todo`` into ``blobs/`` (inside the transaction);
        what must be synced before its commit: the files written and every directory."""
        durable: list[Path] = []
        dirs: set[Path] = set()
        for item, partial_size in todo:
            layer = _layer(item)
            data_path = self.layout.data_path(layer.blob_id)
            if data_path.parent not in dirs:
                data_path.parent.mkdir(DIR_MODE, exist_ok=True)
                dirs.add(data_path.parent)
            if isinstance(item, Ingest):
                move_in(self.layout, layer.blob_id, item.path,
                        item.pieces_path if partial_size is None else None, undo)
            elif partial_size is None:  # its layer goes into the database (commit)
                # any file already there has no row: a leftover, overwritten
                undo.append(partial(data_path.unlink, missing_ok=True))
                write_file(data_path, item.data)
                durable.append(data_path)
            else:  # replaces the partial's file whole, as a rename does
                ing = self.new()
                ing.write(item.data)
                ing.finish()
                move_in(self.layout, layer.blob_id, ing.path, None, undo)
                durable.append(data_path)
        return durable + sorted(dirs)


def _layer(item: Ingest | Held) -> PieceLayer:
    assert item.layer is not None  # an Ingest is finished before its batch commits
    return item.layer


def _rows(conn: sqlite3.Connection, blob_ids: Sequence[BlobId]
          ) -> dict[bytes, tuple[int, int]]:
    """(complete, piece_size) of those of ``blob_ids`` that have a row, by digest."""
    out: dict[bytes, tuple[int, int]] = {}
    for digests, marks in id_batches(blob_ids):
        for d, complete, piece_size in conn.execute(
                f"SELECT id, complete, piece_size FROM blobs WHERE id IN ({marks})", digests):
            out[bytes(d)] = (int(complete), int(piece_size))
    return out


def write_journal(layout: Layout, blob_ids: Sequence[BlobId], undo: Undo) -> Path:
    """Name, in ``tmp/``, the blobs whose files are about to appear in ``blobs/`` inside this
    transaction (one file however many): if the process dies before its commit, the next open
    removes the files of those that got no row.  The caller removes it when the transaction
    is over."""
    path = layout.tmp / f"journal-{os.getpid()}-{uuid.uuid4().hex}.moving"
    undo.append(partial(path.unlink, missing_ok=True))
    write_file(path, "\n".join(b.hex for b in blob_ids).encode())
    return path


def create_partial(db: MetaDB, layout: Layout, layer: PieceLayer, lease: LeaseId) -> None:
    """Create the sparse data file, piece layer and row of a new partial blob (nothing if the
    blob is already here, partial or complete, but for a blob kept inline: it moves into a
    data file, which writers need) and lease it."""
    blob_id = layer.blob_id
    tmp = layout.tmp / f"partial-{os.getpid()}-{uuid.uuid4().hex}.tmp"
    journal: Path | None = None
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
                write_file(tmp.with_suffix(".pieces"), layer.to_bytes(), sync=True)
                now = time.time()
                conn.execute("INSERT INTO blobs VALUES (?,?,?,0,?,?,?)",
                             (blob_id.digest, layer.size, layer.piece_size,
                              Bitfield(len(layer)).to_bytes(), now, now))
                journal = write_journal(layout, [blob_id], undo)
                layout.data_path(blob_id).parent.mkdir(DIR_MODE, exist_ok=True)
                move_in(layout, blob_id, tmp, tmp.with_suffix(".pieces"), undo)
                sync_paths(layout, [layout.data_path(blob_id).parent])
            elif (inline := inline_content(conn, blob_id)) is not None:
                write_file(tmp, inline, sync=True)  # its layer stays in the database
                layout.data_path(blob_id).parent.mkdir(DIR_MODE, exist_ok=True)
                move_in(layout, blob_id, tmp, None, undo)
                sync_paths(layout, [layout.data_path(blob_id).parent])
                conn.execute("DELETE FROM contents WHERE id=?", (blob_id.digest,))
            add_lease(conn, blob_id, lease)
    finally:
        for leftover in (tmp, tmp.with_suffix(".pieces"), journal):
            if leftover is not None:
                leftover.unlink(missing_ok=True)


def move_in(layout: Layout, blob_id: BlobId, data_tmp: Path, pieces_tmp: Path | None,
            undo: Undo) -> None:
    """Rename finished files into ``blobs/`` (its subdirectory exists) inside the transaction
    that writes the row, after :func:`write_journal` named the blob.

    Without ``pieces_tmp`` the data replaces a partial blob's file and stays even if the
    transaction aborts (it is valid for the partial row too); otherwise an abort removes
    the files.
    """
    data_path = layout.data_path(blob_id)
    if pieces_tmp is not None:
        pieces_path = layout.pieces_path(blob_id)
        os.replace(pieces_tmp, pieces_path)
        undo.append(partial(pieces_path.unlink, missing_ok=True))
        os.replace(data_tmp, data_path)
        undo.append(partial(data_path.unlink, missing_ok=True))
    else:
        os.replace(data_tmp, data_path)


SYNCFS_MIN = 3
"""From this many files and directories on, one ``syncfs`` beats an fsync each."""
_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)


def sync_paths(layout: Layout, paths: Sequence[Path]) -> None:
    """Make these files and directories (their data, their entries) durable: an fsync each,
    or for many one ``syncfs`` of the home's filesystem (one journal commit however many
    files; Linux)."""
    if len(paths) >= SYNCFS_MIN and _sync_filesystem(layout.home):
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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

