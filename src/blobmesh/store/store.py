"""The blob store: content-addressed files plus SQLite (WAL) metadata, safe across processes.

:class:`Store` is the synchronous façade over the store's parts: :mod:`~blobmesh.store.db`
(metadata), :mod:`~blobmesh.store.ingest` (adds, partial blobs), :mod:`~blobmesh.store.readers`,
:mod:`~blobmesh.store.gc` and :mod:`~blobmesh.store.fsck`.  Async code goes through
:attr:`Store.aio` (:class:`~blobmesh.store.aio.AsyncStore`), never calling a method here.

Invariants (see ``docs/architecture.md``):

* a row in ``blobs`` exists only for a data file that has been fsynced in place; a complete
  blob's data matches its id (verified reads and ``fsck`` detect later rot);
* files are renamed into ``blobs/`` and moved out to ``trash/`` only inside a write
  transaction (``BEGIN IMMEDIATE``), so GC and add in different processes cannot interleave
  between the file move and the row change;
* a blob with a live lease or a pin is never collected; a lease is live while its process runs.
"""

from __future__ import annotations

import io
import os
import threading
import time
import uuid
from collections.abc import AsyncIterable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from blobmesh.errors import BlobNotFoundError, PinNotFoundError, StoreError, VerificationError
from blobmesh.hashing import BlobId, PieceLayer
from blobmesh.store import fsck as fsck_module
from blobmesh.store import gc as gc_module
from blobmesh.store import readers
from blobmesh.store.db import MetaDB, add_lease, has_row, require_complete
from blobmesh.store.ingest import CHUNK, Batch, create_partial, open_source
from blobmesh.store.layout import Bytes, Layout, default_home
from blobmesh.store.leases import LeaseId, pid_start_time
from blobmesh.store.partial import PartialBlob, flush_many
from blobmesh.store.readers import BlobReader
from blobmesh.store.types import BlobInfo, FsckReport, GcReport, Pin, Progress
from blobmesh.types import Bitfield

if TYPE_CHECKING:
    from blobmesh.store.aio import AsyncStore

PARTIAL_GRACE = gc_module.PARTIAL_GRACE
AddSource = Bytes | str | os.PathLike[str]
"""What :meth:`Store.add_many` takes: the content itself, or the path of a file holding it."""


class Store:
    """A blob store rooted at a home directory; usable from threads and processes at once."""

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self.layout = Layout(Path(home) if home is not None else default_home())
        try:
            self.layout.create()
        except OSError as exc:
            raise StoreError(f"cannot create store home {self.layout.home}: {exc.strerror}",
                             home=str(self.layout.home)) from exc
        self.db = MetaDB(self.layout)
        self._aio: AsyncStore | None = None
        self._aio_lock = threading.Lock()
        gc_module.recover(self.db, self.layout)

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def home(self) -> Path:
        return self.layout.home

    @property
    def aio(self) -> AsyncStore:
        """This store's async boundary, one per store (made on first use, closed with it)."""
        with self._aio_lock:
            if self._aio is None:
                from blobmesh.store.aio import AsyncStore

                self._aio = AsyncStore(self)
            return self._aio

    def close(self) -> None:
        """Close the store (after the calls its :attr:`aio` is running)."""
        if self._aio is not None:
            self._aio.close()
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- adding ----------------------------------------------------------------------------

    def add_path(self, path: str | os.PathLike[str], lease: LeaseId | None = None,
                 progress: Progress | None = None) -> BlobInfo:
        """Add a file's content; returns its info.  Constant memory."""
        with open_source(path) as f:
            return self.add_stream(f, lease, progress)

    def add_bytes(self, data: Bytes, lease: LeaseId | None = None) -> BlobInfo:
        return self.add_many([data], lease)[0]

    def add_stream(self, source: BinaryIO | io.RawIOBase | Iterable[Bytes],
                   lease: LeaseId | None = None, progress: Progress | None = None) -> BlobInfo:
        """Add from a binary file object or an iterable of byte chunks."""
        with Batch(self.layout) as batch:
            batch.add(source, progress)
            return batch.commit(self.db, lease)[0]

    def add_many(self, sources: Iterable[AddSource], lease: LeaseId | None = None,
                 progress: Progress | None = None, *, inline: bool = False) -> list[BlobInfo]:
        """Add many blobs (contents, or paths of files) in one transaction; their infos in
        order.  Atomic: all of them become visible or none (a crash or error leaves nothing),
        at the cost of one commit and one fsync per blob file instead of a commit each.

        With ``inline``, contents of at most ``HELD_MAX`` bytes are kept in the database, not
        in files: for many small blobs at once (no file create each)."""
        with Batch(self.layout, inline=inline) as batch:
            for source in sources:
                if isinstance(source, bytes | bytearray | memoryview):
                    batch.add(source, progress)
                else:
                    with open_source(source) as f:
                        batch.add(f, progress)
            return batch.commit(self.db, lease)

    async def add_async_stream(self, source: AsyncIterable[bytes], lease: LeaseId | None = None,
                               progress: Progress | None = None) -> BlobInfo:
        """Add from an async iterator of byte chunks."""
        import asyncio

        with Batch(self.layout) as batch:
            ing = batch.new()
            async for chunk in source:
                await asyncio.to_thread(ing.write, chunk)
                if progress:
                    progress(len(chunk))
            await asyncio.to_thread(ing.finish)
            return (await asyncio.to_thread(batch.commit, self.db, lease))[0]

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
        with self.db.write() as conn:
            require_complete(conn, blob_id)
            add_lease(conn, blob_id, lease)

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
        return readers.open_reader(self.db, self.layout, blob_id, lease, verify=verify)

    def verify(self, blob_id: BlobId, lease: LeaseId | None = None, *, max_age: float = 0.0
               ) -> bool:
        """Check that a complete blob still matches its id (CorruptBlobError if not; nothing
        is quarantined here), skipping the full rehash when one of the same, unchanged data
        file was recorded less than ``max_age`` seconds ago
        (:func:`~blobmesh.store.readers.verify_complete`); ``lease`` is recorded as by
        :meth:`get_reader`.  True when it rehashed."""
        return readers.verify_complete(self.db, self.layout, blob_id, lease, max_age=max_age)

    def advise_lease_dropped(self, lease: LeaseId, blob_id: BlobId) -> None:
        self.db.drop_lease(lease, blob_id)

    def advise_of_pid(self, pid: int) -> None:
        """Note that ``pid`` is alive; its leases record its start time from now on."""
        start = pid_start_time(pid)
        with self.db.write() as conn:
            conn.execute("UPDATE leases SET pid_start=? WHERE pid=? AND pid_start IS NULL",
                         (start, pid))

    def advise_pid_terminated(self, pid: int) -> None:
        """Drop every lease held by ``pid``."""
        with self.db.write() as conn:
            conn.execute("DELETE FROM leases WHERE pid=?", (pid,))

    def leases(self, blob_id: BlobId | None = None) -> list[tuple[BlobId, LeaseId, bool]]:
        """(blob, lease, alive) for every recorded lease, optionally of one blob."""
        return self.db.leases(blob_id)

    # --- queries ---------------------------------------------------------------------------

    def has(self, blob_id: BlobId) -> bool:
        """True when the complete blob is here."""
        return self.db.has(blob_id)

    def info(self, blob_id: BlobId) -> BlobInfo:
        return self.db.info(blob_id)

    def blobs(self) -> list[BlobInfo]:
        """Every blob, complete or partial, oldest first."""
        return self.db.blobs()

    def piece_layer(self, blob_id: BlobId) -> PieceLayer:
        """The stored piece layer, checked against the blob id."""
        return readers.piece_layer(self.db, self.layout, blob_id)

    def bitfield(self, blob_id: BlobId) -> Bitfield:
        """Which pieces of the blob are present (all of them for a complete blob)."""
        return self.db.bitfield(blob_id)

    def read_range(self, blob_id: BlobId, offset: int, length: int, *,
                   verify: bool = False) -> bytes:
        """Read ``length`` bytes at ``offset`` of a complete blob."""
        with self.get_reader(blob_id, None, verify=verify) as r:
            r.seek(offset)
            return r.read(length)

    def read_piece(self, blob_id: BlobId, index: int, *, verify: bool = True) -> bytes:
        """Read one present piece (also from a partial blob), verified by default."""
        return readers.read_piece(self.db, self.layout, blob_id, index, verify=verify)

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
        with self.db.write() as conn:
            if not has_row(conn, blob_id):
                raise BlobNotFoundError(f"blob {blob_id} is not in the store", blob_id=blob_id)
            conn.execute("INSERT OR REPLACE INTO pins VALUES (?,?,?)",
                         (name, blob_id.digest, time.time()))

    def unpin(self, name: str) -> BlobId:
        with self.db.write() as conn:
            row = conn.execute("SELECT blob FROM pins WHERE name=?", (name,)).fetchone()
            if row is None:
                raise PinNotFoundError(f"no pin named {name!r}", name=name)
            conn.execute("DELETE FROM pins WHERE name=?", (name,))
        return BlobId(bytes(row[0]))

    def pins(self) -> list[Pin]:
        return self.db.pins()

    # --- partial blobs ---------------------------------------------------------------------

    def begin_partial(self, layer: PieceLayer, lease: LeaseId) -> PartialBlob:
        """Open (creating if needed) a partial blob to be filled piece by piece.

        If the blob is already here (partial or complete) its stored piece layer is used,
        which may be at another piece size than ``layer``: write through the returned
        writer's ``layer``.
        """
        create_partial(self.db, self.layout, layer, lease)
        return PartialBlob(self.db, self.layout, self.piece_layer(layer.blob_id), lease)

    def flush_partials(self, partials: Iterable[PartialBlob]) -> list[Bitfield]:
        """Flush many partial blobs in one transaction; their present sets, in order."""
        return flush_many(self.db, partials)

    # --- garbage collection and fsck -------------------------------------------------------

    def gc(self, *, dry_run: bool = False, partial_grace: float = PARTIAL_GRACE) -> GcReport:
        """Delete every blob that no live lease and no pin holds.

        Leases of processes that no longer run are dropped first.  Partial blobs are kept
        for ``partial_grace`` seconds after their last write so an interrupted download can
        resume.  A dry run reports the same and changes nothing (not even dead leases).
        """
        return gc_module.collect(self.db, self.layout, dry_run=dry_run,
                                 partial_grace=partial_grace)

    def fsck(self, *, repair: bool = False, progress: Progress | None = None) -> FsckReport:
        """Rehash every present piece; report (and with ``repair`` quarantine) bad data."""
        return fsck_module.run_fsck(self.db, self.layout, repair=repair, progress=progress)

    def quarantine(self, blob_id: BlobId) -> None:
        """Move a blob found corrupt out of the store (into ``quarantine/``) and forget it."""
        fsck_module.quarantine(self.db, self.layout, blob_id,
                               [self.layout.data_path(blob_id), self.layout.pieces_path(blob_id)])
