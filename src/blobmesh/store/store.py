"""The blob store: content-addressed files plus SQLite (WAL) metadata, safe across processes.

Invariants (see ``docs/architecture.md``):

* a row in ``blobs`` exists only for a data file that has been fsynced in place; a complete
  blob's data matches its id (verified reads and ``fsck`` detect later rot);
* files are renamed into ``blobs/`` and moved out to ``trash/`` only inside a write
  transaction (``BEGIN IMMEDIATE``), so GC and add in different processes cannot interleave
  between the file move and the row change;
* a blob with a live lease or a pin is never collected; a lease is live while its process runs.
"""

from __future__ import annotations

import errno
import io
import itertools
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from blobmesh.errors import (
    BlobIncompleteError,
    BlobNotFoundError,
    CorruptBlobError,
    PinNotFoundError,
    SourceError,
    StoreError,
    StoreFullError,
    VerificationError,
)
from blobmesh.hashing import BlobId, PieceLayer, TreeHasher, hash_piece, piece_count
from blobmesh.store.bitfield import Bitfield
from blobmesh.store.layout import Layout, blob_id_from_name, default_home, fsync_dir
from blobmesh.store.leases import LeaseId, pid_alive, pid_start_time

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from blobmesh.store.partial import PartialBlob

Progress = Callable[[int], None]
"""Called with the number of bytes just processed."""
Undo = list[Callable[[], object]]
"""Actions that revert file moves when their write transaction does not commit."""

CHUNK = 16 * 1024 * 1024  # large reads and writes; hashing overlaps each in a thread
PARTIAL_GRACE = 24 * 3600.0
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# below this, hashing a chunk in a helper thread costs more than it overlaps
_OVERLAP_MIN = 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    id BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    piece_size INTEGER NOT NULL,
    complete INTEGER NOT NULL,
    have BLOB NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    blob BLOB NOT NULL,
    consumer TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start INTEGER,
    created REAL NOT NULL,
    PRIMARY KEY (blob, consumer, pid)
);
CREATE INDEX IF NOT EXISTS leases_pid ON leases(pid);
CREATE TABLE IF NOT EXISTS pins (
    name TEXT PRIMARY KEY,
    blob BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pins_blob ON pins(blob);
"""


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What the store knows about one blob."""

    blob_id: BlobId
    size: int
    piece_size: int
    complete: bool
    pieces_present: int
    pieces_total: int
    created: float
    bytes_present: int
    pins: tuple[str, ...] = ()
    leases: int = 0


@dataclass(frozen=True, slots=True)
class Pin:
    name: str
    blob_id: BlobId
    created: float


@dataclass(slots=True)
class GcReport:
    deleted: list[BlobId] = field(default_factory=list)
    bytes_freed: int = 0
    dead_leases_dropped: int = 0
    kept: int = 0


@dataclass(slots=True)
class FsckProblem:
    kind: str  # "corrupt", "missing", "truncated", "orphan", "bad-pieces"
    path: str
    blob_id: BlobId | None = None
    detail: str = ""


@dataclass(slots=True)
class FsckReport:
    checked: int = 0
    bytes_checked: int = 0
    problems: list[FsckProblem] = field(default_factory=list)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


class Store:
    """A blob store rooted at a home directory; usable from threads and processes at once."""

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self.layout = Layout(Path(home) if home is not None else default_home())
        try:
            self.layout.create()
        except OSError as exc:
            raise StoreError(f"cannot create store home {self.layout.home}: {exc.strerror}",
                             home=str(self.layout.home)) from exc
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.layout.db, timeout=60.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=60000")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store database {self.layout.db}: {exc}",
                             home=str(self.layout.home)) from exc
        self._recover()

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def home(self) -> Path:
        return self.layout.home

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self, undo: Undo | None = None) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock for its whole duration.

        When it does not commit (the body raised, or COMMIT failed, e.g. on a full disk) the
        ``undo`` actions run newest first while the write lock is still held, so no other
        process sees files that disagree with the rows.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                for action in reversed(undo or ()):
                    with suppress(OSError):
                        action()
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._db_error(exc) from exc
                raise

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._db.execute(sql, args))
            except sqlite3.Error as exc:
                raise self._db_error(exc) from exc

    def _db_error(self, exc: sqlite3.Error) -> StoreError:
        """A one-line store error for a failed SQLite statement (e.g. locked for too long)."""
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return StoreFullError(f"disk full: cannot update the store database in {self.home}",
                                  home=str(self.home))
        return StoreError(f"store database {self.layout.db}: {exc}", home=str(self.home))

    def _recover(self) -> None:
        """Undo what killed processes left: temp files, half-done moves in, half-done GCs."""
        markers: list[Path] = []
        for tmp in self.layout.tmp.iterdir():
            owner = _owner_pid(tmp.name)
            if owner is not None and pid_alive(owner, None):
                continue
            if tmp.suffix == ".moving":
                markers.append(tmp)
            else:
                with suppress(OSError):
                    tmp.unlink()
        if not markers and not any(self.layout.trash.iterdir()):
            return
        with self._write() as db:
            def has_row(blob_id: BlobId) -> bool:
                return db.execute("SELECT 1 FROM blobs WHERE id=?",
                                  (blob_id.digest,)).fetchone() is not None

            for marker in markers:
                # the owner died between moving files into blobs/ and committing their row
                with suppress(OSError):
                    moved = blob_id_from_name(marker.read_text())
                    if moved is not None and not has_row(moved):
                        self.layout.data_path(moved).unlink(missing_ok=True)
                        self.layout.pieces_path(moved).unlink(missing_ok=True)
                marker.unlink(missing_ok=True)
            for item in self.layout.trash.iterdir():
                name = item.name.split("~")[0]
                blob_id = blob_id_from_name(name)
                if blob_id is not None and has_row(blob_id):
                    # a GC died before its commit: the row survived, so the file goes back
                    # (unless the blob was added again meanwhile)
                    dest = self.layout.pieces_path(blob_id) if name.endswith(".pieces") \
                        else self.layout.data_path(blob_id)
                    dest.parent.mkdir(exist_ok=True)
                    if not dest.exists():
                        os.replace(item, dest)
                        continue
                item.unlink(missing_ok=True)

    # --- adding ----------------------------------------------------------------------------

    def add_path(self, path: str | os.PathLike[str], lease: LeaseId | None = None,
                 progress: Progress | None = None) -> BlobInfo:
        """Add a file's content; returns its info.  Constant memory."""
        p = Path(path)
        try:
            f = open(p, "rb")  # noqa: SIM115 - closed below, errors mapped first
        except FileNotFoundError as exc:
            raise SourceError(f"no such file: {p}", path=str(p)) from exc
        except IsADirectoryError as exc:
            raise SourceError(f"is a directory: {p}", path=str(p)) from exc
        except PermissionError as exc:
            raise SourceError(f"permission denied: {p}", path=str(p)) from exc
        except OSError as exc:
            raise SourceError(f"cannot read {p}: {exc.strerror}", path=str(p)) from exc
        with f:
            return self.add_stream(f, lease, progress)

    def add_bytes(self, data: bytes | bytearray | memoryview,
                  lease: LeaseId | None = None) -> BlobInfo:
        mv = memoryview(data)
        return self.add_stream((mv[i : i + CHUNK] for i in range(0, len(mv), CHUNK)), lease)

    def add_stream(self, source: BinaryIO | io.RawIOBase | Iterable[bytes | memoryview],
                   lease: LeaseId | None = None, progress: Progress | None = None) -> BlobInfo:
        """Add from a binary file object or an iterable of byte chunks."""
        # chunks read from a file object alternate between two buffers of ours, so one may
        # still be hashed while the next is read; a caller's chunks are done with at once
        keep = hasattr(source, "read")
        with self._ingest() as ing:
            for chunk in _chunks(source):
                ing.write(chunk, keep=keep)
                if progress:
                    progress(len(chunk))
            return self._commit_ingest(ing, lease)

    async def add_async_stream(self, source: AsyncIterable[bytes], lease: LeaseId | None = None,
                               progress: Progress | None = None) -> BlobInfo:
        """Add from an async iterator of byte chunks."""
        import asyncio

        with self._ingest() as ing:
            async for chunk in source:
                await asyncio.to_thread(ing.write, chunk)
                if progress:
                    progress(len(chunk))
            return await asyncio.to_thread(self._commit_ingest, ing, lease)

    @contextmanager
    def _ingest(self) -> Iterator[_Ingest]:
        ing: _Ingest | None = None
        try:
            with self._full_disk("adding to"):
                ing = _Ingest(self.layout.tmp / f"add-{os.getpid()}-{uuid.uuid4().hex}.tmp")
                yield ing
        except OSError as exc:
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"add failed: {exc}", home=str(self.home)) from exc
        finally:
            if ing is not None:
                ing.discard()

    @contextmanager
    def _full_disk(self, doing: str) -> Iterator[None]:
        """Turn ENOSPC/EDQUOT into :class:`StoreFullError` (``_write`` maps SQLite's own)."""
        try:
            yield
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise StoreFullError(f"disk full while {doing} {self.home}; nothing was stored",
                                     home=str(self.home)) from exc
            raise

    def _commit_ingest(self, ing: _Ingest, lease: LeaseId | None) -> BlobInfo:
        blob_id, layer = ing.finish()
        _write_file_synced(ing.pieces_path, layer.to_bytes())
        now = time.time()
        undo: Undo = []
        with self._write(undo) as db:
            row = db.execute("SELECT complete, piece_size FROM blobs WHERE id=?",
                             (blob_id.digest,)).fetchone()
            if row is None:
                db.execute("INSERT INTO blobs VALUES (?,?,?,1,?,?,?)",
                           (blob_id.digest, layer.size, layer.piece_size,
                            Bitfield.full(len(layer)).to_bytes(), now, now))
                self._move_in(blob_id, ing.path, ing.pieces_path, undo)
            elif not row[0]:
                # A partial copy is here: the complete data serves it at its own piece size,
                # so its piece layer (which readers and writers already use) stays.
                db.execute("UPDATE blobs SET complete=1, have=?, updated=? WHERE id=?",
                           (Bitfield.full(piece_count(layer.size, row[1])).to_bytes(), now,
                            blob_id.digest))
                self._move_in(blob_id, ing.path, None, undo)
            if lease is not None:
                self._add_lease(db, blob_id, lease)
            return self.info(blob_id)

    def _move_in(self, blob_id: BlobId, data_tmp: Path, pieces_tmp: Path | None,
                 undo: Undo) -> None:
        """Rename finished files into ``blobs/`` inside the transaction that writes the row.

        Without ``pieces_tmp`` the data replaces a partial blob's file and stays even if the
        transaction aborts (it is valid for the partial row too); otherwise an abort removes
        the files.  A marker in ``tmp/`` names the blob until the caller is done, so if this
        process dies before its commit the next open removes files that never got a row.
        """
        data_path = self.layout.data_path(blob_id)
        marker = data_tmp.with_suffix(".moving")
        marker.write_text(blob_id.hex)
        undo.append(partial(marker.unlink, missing_ok=True))
        data_path.parent.mkdir(exist_ok=True)
        if pieces_tmp is not None:
            pieces_path = self.layout.pieces_path(blob_id)
            os.replace(pieces_tmp, pieces_path)
            undo.append(partial(pieces_path.unlink, missing_ok=True))
            os.replace(data_tmp, data_path)
            undo.append(partial(data_path.unlink, missing_ok=True))
        else:
            os.replace(data_tmp, data_path)
        fsync_dir(data_path.parent)

    # --- the lease API of the seed ---------------------------------------------------------

    def store(self, data: bytes, lease: LeaseId, expected: BlobId | None = None) -> BlobId:
        """Store ``data`` under its content id (deduplicated) and lease it to ``lease``."""
        if expected is not None:
            from blobmesh.hashing import hash_bytes

            actual = hash_bytes(data)
            if actual != expected:
                raise VerificationError(f"data hashes to {actual.short()}, not {expected.short()}")
        return self.add_bytes(data, lease).blob_id

    def lease_by_content(self, blob_id: BlobId, lease: LeaseId) -> None:
        """Lease an existing complete blob; :class:`BlobNotFoundError` if it is not here."""
        with self._write() as db:
            self._require_complete(db, blob_id)
            self._add_lease(db, blob_id, lease)

    def get_data(self, blob_id: BlobId, lease: LeaseId, *, verify: bool = True) -> bytes:
        """The whole content (leased to ``lease``); verified against the id by default."""
        with self.get_reader(blob_id, lease, verify=verify) as r:
            return r.read()

    def get_reader(self, blob_id: BlobId, lease: LeaseId | None, *, verify: bool = False
                   ) -> BlobReader:
        """A seekable reader that keeps the blob alive until it is closed.

        ``lease`` is recorded (and stays) as for :meth:`lease_by_content`; with None, only the
        reader's own hold protects the blob, which is what one-off reads want.
        """
        hold = LeaseId.new(f"reader[{lease.consumer if lease else 'once'}]")
        with self._write() as db:
            size = self._require_complete(db, blob_id)
            if lease is not None:
                self._add_lease(db, blob_id, lease)
            self._add_lease(db, blob_id, hold)
        try:
            layer = self.piece_layer(blob_id) if verify else None
            fd = os.open(self.layout.data_path(blob_id), os.O_RDONLY)
        except FileNotFoundError as exc:
            self._drop_lease(hold, blob_id)
            raise CorruptBlobError(f"data file of {blob_id} is missing; run fsck",
                                   blob_id=blob_id) from exc
        except BaseException:
            self._drop_lease(hold, blob_id)
            raise
        return BlobReader(self, blob_id, fd, size, layer, hold)

    def advise_lease_dropped(self, lease: LeaseId, blob_id: BlobId) -> None:
        self._drop_lease(lease, blob_id)

    def advise_of_pid(self, pid: int) -> None:
        """Note that ``pid`` is alive; its leases record its start time from now on."""
        start = pid_start_time(pid)
        with self._write() as db:
            db.execute("UPDATE leases SET pid_start=? WHERE pid=? AND pid_start IS NULL",
                       (start, pid))

    def advise_pid_terminated(self, pid: int) -> None:
        """Drop every lease held by ``pid``."""
        with self._write() as db:
            db.execute("DELETE FROM leases WHERE pid=?", (pid,))

    def leases(self, blob_id: BlobId | None = None) -> list[tuple[BlobId, LeaseId, bool]]:
        """(blob, lease, alive) for every recorded lease, optionally of one blob."""
        sql = "SELECT blob, consumer, pid, pid_start FROM leases"
        rows = self._query(sql + " WHERE blob=?", (blob_id.digest,)) if blob_id else \
            self._query(sql)
        return [(BlobId(bytes(b)), LeaseId(str(c), int(p)),
                 pid_alive(int(p), s))
                for b, c, p, s in rows]

    def _add_lease(self, db: sqlite3.Connection, blob_id: BlobId, lease: LeaseId) -> None:
        # Taking a lease again refreshes its process start time: a row left by a dead process
        # whose pid (and stable consumer name) was reused must not make the new lease look dead.
        db.execute("INSERT INTO leases VALUES (?,?,?,?,?) ON CONFLICT (blob, consumer, pid) "
                   "DO UPDATE SET pid_start=excluded.pid_start",
                   (blob_id.digest, lease.consumer, lease.pid, pid_start_time(lease.pid),
                    time.time()))

    def _drop_lease(self, lease: LeaseId, blob_id: BlobId) -> None:
        with self._write() as db:
            db.execute("DELETE FROM leases WHERE blob=? AND consumer=? AND pid=?",
                       (blob_id.digest, lease.consumer, lease.pid))

    # --- queries ---------------------------------------------------------------------------

    def _blob_row(self, blob_id: BlobId) -> tuple[Any, ...]:
        rows = self._query("SELECT id, size, piece_size, complete, have, created FROM blobs "
                           "WHERE id=?", (blob_id.digest,))
        if not rows:
            raise BlobNotFoundError(f"blob {blob_id} is not in the store", blob_id=blob_id)
        return rows[0]

    def _require_complete(self, db: sqlite3.Connection, blob_id: BlobId) -> int:
        """The size of a complete blob; raises if it is missing or partial."""
        row = db.execute("SELECT complete, size FROM blobs WHERE id=?",
                         (blob_id.digest,)).fetchone()
        if row is None:
            raise BlobNotFoundError(f"blob {blob_id} is not in the store", blob_id=blob_id)
        if not row[0]:
            raise BlobIncompleteError(f"blob {blob_id} is only partially present",
                                      blob_id=blob_id)
        return int(row[1])

    def has(self, blob_id: BlobId) -> bool:
        """True when the complete blob is here."""
        rows = self._query("SELECT complete FROM blobs WHERE id=?", (blob_id.digest,))
        return bool(rows and rows[0][0])

    def info(self, blob_id: BlobId) -> BlobInfo:
        row = self._blob_row(blob_id)
        pins = tuple(str(r[0]) for r in self._query(
            "SELECT name FROM pins WHERE blob=? ORDER BY name", (blob_id.digest,)))
        nleases = int(self._query("SELECT count(*) FROM leases WHERE blob=?",
                                  (blob_id.digest,))[0][0])
        return _info_from_row(row, pins, nleases)

    def blobs(self) -> list[BlobInfo]:
        """Every blob, complete or partial, oldest first."""
        rows = self._query("SELECT id, size, piece_size, complete, have, created FROM blobs "
                           "ORDER BY created, id")
        pins: dict[bytes, list[str]] = {}
        for name, blob in self._query("SELECT name, blob FROM pins"):
            pins.setdefault(bytes(blob), []).append(str(name))
        counts = {bytes(b): int(n) for b, n in
                  self._query("SELECT blob, count(*) FROM leases GROUP BY blob")}
        return [_info_from_row(r, tuple(sorted(pins.get(bytes(r[0]), []))),
                               counts.get(bytes(r[0]), 0))
                for r in rows]

    def piece_layer(self, blob_id: BlobId) -> PieceLayer:
        """The stored piece layer, checked against the blob id."""
        row = self._blob_row(blob_id)
        try:
            raw = self.layout.pieces_path(blob_id).read_bytes()
        except FileNotFoundError as exc:
            raise CorruptBlobError(f"piece layer of {blob_id} is missing; run fsck",
                                   blob_id=blob_id) from exc
        try:
            return PieceLayer.from_bytes(blob_id, int(row[1]), int(row[2]), raw)
        except VerificationError as exc:
            raise CorruptBlobError(f"piece layer of {blob_id} is corrupt; run fsck",
                                   blob_id=blob_id) from exc

    def bitfield(self, blob_id: BlobId) -> Bitfield:
        """Which pieces of the blob are present (all of them for a complete blob)."""
        row = self._blob_row(blob_id)
        return Bitfield(piece_count(int(row[1]), int(row[2])), bytes(row[4]))

    def read_range(self, blob_id: BlobId, offset: int, length: int, *,
                   verify: bool = False) -> bytes:
        """Read ``length`` bytes at ``offset`` of a complete blob."""
        with self.get_reader(blob_id, None, verify=verify) as r:
            r.seek(offset)
            return r.read(length)

    def read_piece(self, blob_id: BlobId, index: int, *, verify: bool = True) -> bytes:
        """Read one present piece (also from a partial blob), verified by default."""
        row = self._blob_row(blob_id)
        size, piece_size = int(row[1]), int(row[2])
        have = Bitfield(piece_count(size, piece_size), bytes(row[4]))
        if index not in have:
            raise BlobIncompleteError(f"piece {index} of {blob_id} is not present",
                                      blob_id=blob_id, piece=index)
        start = index * piece_size
        length = max(0, min(piece_size, size - start))
        try:
            with open(self.layout.data_path(blob_id), "rb") as f:
                data = os.pread(f.fileno(), length, start)
        except FileNotFoundError as exc:
            self._blob_row(blob_id)  # collected meanwhile: BlobNotFoundError, not corruption
            raise CorruptBlobError(f"data file of {blob_id} is missing; run fsck",
                                   blob_id=blob_id) from exc
        if verify:
            layer = self.piece_layer(blob_id)
            if len(data) != length or hash_piece(data) != layer.hashes[index]:
                raise CorruptBlobError(f"piece {index} of {blob_id} is corrupt on disk",
                                       blob_id=blob_id, piece=index)
        return data

    def export(self, blob_id: BlobId, dest: str | os.PathLike[str], *, verify: bool = True,
               progress: Progress | None = None) -> None:
        """Write the blob to ``dest`` atomically, verifying it on the way."""
        d = Path(dest)
        tmp = d.with_name(f".{d.name}.{uuid.uuid4().hex[:8]}.part")
        with self.get_reader(blob_id, None, verify=verify) as r:
            try:
                with open(tmp, "wb") as out:
                    while chunk := r.read(CHUNK):
                        out.write(chunk)
                        if progress:
                            progress(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, d)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    # --- pins ------------------------------------------------------------------------------

    def pin(self, blob_id: BlobId, name: str) -> None:
        """Protect a blob (complete or partial) from GC under ``name`` (re-pointing it)."""
        if not name or len(name) > 256:
            raise StoreError("a pin name is 1 to 256 characters")
        with self._write() as db:
            if not db.execute("SELECT 1 FROM blobs WHERE id=?", (blob_id.digest,)).fetchone():
                raise BlobNotFoundError(f"blob {blob_id} is not in the store", blob_id=blob_id)
            db.execute("INSERT OR REPLACE INTO pins VALUES (?,?,?)",
                       (name, blob_id.digest, time.time()))

    def unpin(self, name: str) -> BlobId:
        with self._write() as db:
            row = db.execute("SELECT blob FROM pins WHERE name=?", (name,)).fetchone()
            if row is None:
                raise PinNotFoundError(f"no pin named {name!r}", name=name)
            db.execute("DELETE FROM pins WHERE name=?", (name,))
        return BlobId(bytes(row[0]))

    def pins(self) -> list[Pin]:
        return [Pin(str(n), BlobId(bytes(b)), float(c))
                for n, b, c in self._query("SELECT name, blob, created FROM pins ORDER BY name")]

    # --- partial blobs ---------------------------------------------------------------------

    def begin_partial(self, layer: PieceLayer, lease: LeaseId) -> PartialBlob:
        """Open (creating if needed) a partial blob to be filled piece by piece.

        If the blob is already here (partial or complete) its stored piece layer is used,
        which may be at another piece size than ``layer``: write through the returned
        writer's ``layer``.
        """
        from blobmesh.store.partial import PartialBlob

        blob_id = layer.blob_id
        tmp = self.layout.tmp / f"partial-{os.getpid()}-{uuid.uuid4().hex}.tmp"
        undo: Undo = []
        try:
            with self._full_disk("creating a partial blob in"), self._write(undo) as db:
                if not db.execute("SELECT 1 FROM blobs WHERE id=?",
                                  (blob_id.digest,)).fetchone():
                    with open(tmp, "wb") as f:
                        f.truncate(layer.size)  # sparse: pieces fill it in any order
                        os.fsync(f.fileno())
                    _write_file_synced(tmp.with_suffix(".pieces"), layer.to_bytes())
                    now = time.time()
                    db.execute("INSERT INTO blobs VALUES (?,?,?,0,?,?,?)",
                               (blob_id.digest, layer.size, layer.piece_size,
                                Bitfield(len(layer)).to_bytes(), now, now))
                    self._move_in(blob_id, tmp, tmp.with_suffix(".pieces"), undo)
                self._add_lease(db, blob_id, lease)
        finally:
            for leftover in (tmp, tmp.with_suffix(".pieces"), tmp.with_suffix(".moving")):
                leftover.unlink(missing_ok=True)
        return PartialBlob(self, self.piece_layer(blob_id), lease)

    def _merge_pieces(self, blob_id: BlobId, indices: Iterable[int]) -> Bitfield:
        """Mark pieces present (their data is already durable); completes the blob if full."""
        with self._write() as db:
            row = db.execute("SELECT size, piece_size, have, complete FROM blobs WHERE id=?",
                             (blob_id.digest,)).fetchone()
            if row is None:
                raise BlobNotFoundError(f"blob {blob_id} vanished while being written",
                                        blob_id=blob_id)
            have = Bitfield(piece_count(row[0], row[1]), bytes(row[2]))
            have.update(indices)
            complete = 1 if (row[3] or have.is_complete()) else 0
            db.execute("UPDATE blobs SET have=?, complete=?, updated=? WHERE id=?",
                       (have.to_bytes(), complete, time.time(), blob_id.digest))
            return have

    # --- garbage collection ----------------------------------------------------------------

    def gc(self, *, dry_run: bool = False, partial_grace: float = PARTIAL_GRACE) -> GcReport:
        """Delete every blob that no live lease and no pin holds.

        Leases of processes that no longer run are dropped first.  Partial blobs are kept
        for ``partial_grace`` seconds after their last write so an interrupted download can
        resume.  A dry run reports the same and changes nothing (not even dead leases).
        """
        report = GcReport()
        moved: list[Path] = []
        undo: Undo = []
        # unique names: another GC's trash files of the same blob may still be there
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with suppress(_Rollback), self._write(undo) as db:
            for pid, start in db.execute("SELECT DISTINCT pid, pid_start FROM leases").fetchall():
                if not pid_alive(pid, start):
                    cur = db.execute("DELETE FROM leases WHERE pid=? AND "
                                     "(pid_start IS ? OR pid_start=?)", (pid, start, start))
                    report.dead_leases_dropped += cur.rowcount
            rows = db.execute(
                "SELECT id, size, complete, updated FROM blobs WHERE "
                "id NOT IN (SELECT blob FROM leases) AND id NOT IN (SELECT blob FROM pins)"
            ).fetchall()
            cutoff = time.time() - partial_grace
            for digest, size, complete, updated in rows:
                if not complete and updated > cutoff:
                    report.kept += 1
                    continue
                blob_id = BlobId(bytes(digest))
                report.deleted.append(blob_id)
                report.bytes_freed += size
                if dry_run:
                    continue
                for src in (self.layout.data_path(blob_id), self.layout.pieces_path(blob_id)):
                    dst = self.layout.trash / f"{src.name}~{token}"
                    with suppress(FileNotFoundError):
                        os.replace(src, dst)
                        moved.append(dst)
                        undo.append(partial(os.replace, dst, src))
                db.execute("DELETE FROM blobs WHERE id=?", (digest,))
            if dry_run:
                raise _Rollback
        for path in moved:
            path.unlink(missing_ok=True)
        return report

    # --- fsck ------------------------------------------------------------------------------

    def fsck(self, *, repair: bool = False, progress: Progress | None = None) -> FsckReport:
        """Rehash every present piece; report (and with ``repair`` quarantine) bad data."""
        from blobmesh.store.fsck import run_fsck

        return run_fsck(self, repair=repair, progress=progress)

    def quarantine(self, blob_id: BlobId) -> None:
        """Move a blob found corrupt out of the store (into ``quarantine/``) and forget it."""
        self._quarantine(blob_id, [self.layout.data_path(blob_id),
                                   self.layout.pieces_path(blob_id)])

    def _quarantine(self, blob_id: BlobId, paths: list[Path]) -> None:
        """Move a blob's files out of the store and forget it (caller holds no transaction)."""
        with self._write() as db:
            for p in paths:
                self._move_to_quarantine(p)
            db.execute("DELETE FROM blobs WHERE id=?", (blob_id.digest,))

    def _move_to_quarantine(self, path: Path) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        with suppress(FileNotFoundError):
            dest = self.layout.quarantine / f"{path.name}.{stamp}-{uuid.uuid4().hex[:6]}"
            os.replace(path, dest)


class _Rollback(Exception):
    """Ends a write transaction without committing it."""


class BlobReader(io.RawIOBase):
    """A seekable, read-only binary file over one complete blob.

    It holds a lease of its own until closed, so the blob cannot be collected under it.  With
    verification on, each piece is checked against the blob id the first time it is read.
    """

    def __init__(self, store: Store, blob_id: BlobId, fd: int, size: int,
                 layer: PieceLayer | None, hold: LeaseId) -> None:
        super().__init__()
        self.blob_id = blob_id
        self.size = size
        self._store = store
        self._fd = fd
        self._pos = 0
        self._layer = layer
        self._verified: set[int] = set()
        self._hold = hold

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
        data = os.pread(self._fd, n, self._pos)
        if len(data) != n:
            raise CorruptBlobError(f"blob {self.blob_id} is truncated on disk; run fsck",
                                   blob_id=self.blob_id)
        out[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        out = bytearray()
        while chunk := self.read(CHUNK):
            out += chunk
        return bytes(out)

    def _verify_span(self, start: int, length: int) -> None:
        layer = self._layer
        assert layer is not None
        first, last = start // layer.piece_size, (start + length - 1) // layer.piece_size
        for i in range(first, last + 1):
            if i in self._verified:
                continue
            off, plen = layer.piece_range(i)
            data = os.pread(self._fd, plen, off)
            if len(data) != plen or hash_piece(data) != layer.hashes[i]:
                raise CorruptBlobError(
                    f"blob {self.blob_id} is corrupt on disk (piece {i}); run fsck",
                    blob_id=self.blob_id, piece=i)
            self._verified.add(i)

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
                with suppress(sqlite3.ProgrammingError):
                    self._store._drop_lease(self._hold, self.blob_id)
            finally:
                super().close()


class _Ingest:
    """A temp file being written and hashed for an add (``tmp/add-PID-*.tmp``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pieces_path = path.with_suffix(".pieces")
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._hasher = TreeHasher()
        self._pool: ThreadPoolExecutor | None = None
        self._hashing: Future[None] | None = None

    def write(self, chunk: bytes | bytearray | memoryview, *, keep: bool = False) -> None:
        """Hash and write ``chunk``.

        Large chunks are hashed in a helper thread while this one writes (blake3 releases the
        GIL).  With ``keep`` the caller leaves ``chunk`` unchanged until the next call, so its
        hashing may go on after this returns, overlapping the caller's next read.
        """
        assert self._fd is not None
        self._wait_hashed()
        mv = memoryview(chunk).cast("B")
        if len(mv) < _OVERLAP_MIN:
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
            n = os.write(self._fd, mv)
            mv = mv[n:]

    def finish(self) -> tuple[BlobId, PieceLayer]:
        assert self._fd is not None
        self._wait_hashed()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        return self._hasher.finalize()

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


def _chunks(source: BinaryIO | io.RawIOBase | Iterable[bytes | memoryview]
            ) -> Iterator[bytes | memoryview]:
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


def _write_file_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _owner_pid(name: str) -> int | None:
    parts = name.split("-")
    if len(parts) >= 3 and parts[1].isdigit():
        return int(parts[1])
    return None


def _info_from_row(row: tuple[Any, ...], pins: tuple[str, ...], leases: int) -> BlobInfo:
    digest, size, piece_size, complete, have_raw, created = row
    total = piece_count(size, piece_size)
    have = Bitfield.full(total) if complete else Bitfield(total, bytes(have_raw))
    present = have.count()
    nbytes = present * piece_size
    if total - 1 in have:  # the last piece is short
        nbytes -= total * piece_size - size
    return BlobInfo(BlobId(bytes(digest)), size, piece_size, bool(complete), present,
                    total, float(created), nbytes, pins, leases)
