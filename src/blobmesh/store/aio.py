"""The async boundary of the store: no store call ever blocks the event loop.

Async code reaches a :class:`~blobmesh.store.Store` only through its :class:`AsyncStore`
(``store.aio``, one per store).  Two kinds of threads do the work:

* **one metadata thread** runs everything that touches SQLite, in submission order (an
  actor).  A store whose write lock another process holds (a GC, a big add) makes the calls
  queued behind it wait; the event loop, and so probes, gossip and progress, keep going;
* **a few I/O threads** read and write piece data, which needs no database.

Group commit: concurrent :meth:`AsyncStore.add_bytes` calls are committed together (one
transaction, one ``Store.add_many`` per lease, small contents kept inline in the database: no
file each), and so are concurrent :meth:`AsyncStore.flush`
calls (``Store.flush_partials``).  A batch starts as soon as the previous one is done, so a lone
call waits for nothing; under load, batches grow by themselves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from blobmesh.errors import BlobNotFoundError, CorruptBlobError, VerificationError
from blobmesh.hashing import BlobId, PieceLayer, hash_bytes
from blobmesh.store.layout import Bytes
from blobmesh.store.leases import LeaseId
from blobmesh.store.partial import PartialBlob
from blobmesh.store.piece_reader import PieceReader
from blobmesh.store.readers import BlobReader, read_whole
from blobmesh.store.types import BlobInfo, Pin
from blobmesh.types import Bitfield

if TYPE_CHECKING:
    from blobmesh.store.store import AddSource, Store

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
IO_THREADS = 4


class AsyncStore:
    """Awaitable store calls, run off the event loop (see the module docstring).

    Everything a :class:`Store` method raises is raised here unchanged.
    """

    def __init__(self, store: Store, *, io_threads: int = IO_THREADS) -> None:
        self.store = store
        self._meta = ThreadPoolExecutor(1, thread_name_prefix="blobmesh-store-meta")
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="blobmesh-store-io")
        self._adds: GroupCommit[tuple[Bytes, LeaseId | None, BlobId | None], BlobInfo] = \
            GroupCommit(self._meta, self._add_batch)
        self._flushes: GroupCommit[PartialBlob, Bitfield] = \
            GroupCommit(self._meta, self._flush_batch)

    def close(self) -> None:
        """Finish every call already made; later ones raise (called by ``Store.close``)."""
        self._meta.shutdown(wait=True)
        self._io.shutdown(wait=True)

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any,
                   **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, functools.partial(fn, *args, **kwargs))

    # --- metadata (the metadata thread) ----------------------------------------------------

    async def has(self, blob_id: BlobId) -> bool:
        """True when the complete blob is here."""
        return await self._run(self._meta, self.store.has, blob_id)

    async def info(self, blob_id: BlobId) -> BlobInfo:
        return await self._run(self._meta, self.store.info, blob_id)

    async def blobs(self) -> list[BlobInfo]:
        return await self._run(self._meta, self.store.blobs)

    async def bitfield(self, blob_id: BlobId) -> Bitfield | None:
        """The present pieces, or None when the blob is not here at all."""
        return await self._run(self._meta, self.store.db.find_bitfield, blob_id)

    async def piece_layer(self, blob_id: BlobId) -> PieceLayer | None:
        """The stored piece layer (checked against the id), or None when the blob is not
        here at all."""
        return await self._run(self._meta, self._find_layer, blob_id)

    def _find_layer(self, blob_id: BlobId) -> PieceLayer | None:
        if self.store.db.find_row(blob_id) is None:  # the common case of a new blob: no raise
            return None
        try:
            return self.store.piece_layer(blob_id)
        except BlobNotFoundError:  # collected in between
            return None

    async def complete_sizes(self, blob_ids: Sequence[BlobId]) -> dict[BlobId, int]:
        """Sizes of those of ``blob_ids`` that are here complete (one query)."""
        return await self._run(self._meta, self.store.db.complete_sizes, blob_ids)

    async def pin(self, blob_id: BlobId, name: str) -> None:
        await self._run(self._meta, self.store.pin, blob_id, name)

    async def unpin(self, name: str) -> BlobId:
        return await self._run(self._meta, self.store.unpin, name)

    async def pins(self) -> list[Pin]:
        return await self._run(self._meta, self.store.pins)

    async def lease_by_content(self, blob_id: BlobId, lease: LeaseId) -> None:
        await self._run(self._meta, self.store.lease_by_content, blob_id, lease)

    async def advise_lease_dropped(self, lease: LeaseId, blob_id: BlobId) -> None:
        await self._run(self._meta, self.store.advise_lease_dropped, lease, blob_id)

    async def get_reader(self, blob_id: BlobId, lease: LeaseId | None, *,
                         verify: bool = False) -> BlobReader:
        """A reader as ``Store.get_reader``; read and close it through :meth:`io`."""
        return await self._run(self._meta, self.store.get_reader, blob_id, lease, verify=verify)

    async def piece_reader(self, layer: PieceLayer, *, verify: bool) -> PieceReader:
        """A reader of one blob's pieces for a sender; read and close it through :meth:`io`."""
        return await self._run(self._meta, PieceReader, self.store, layer, verify=verify)

    async def begin_partial(self, layer: PieceLayer, lease: LeaseId) -> PartialBlob:
        """As ``Store.begin_partial``; write pieces through :meth:`io`, make them present with
        :meth:`flush`, and close it with :meth:`close_partial`."""
        return await self._run(self._meta, self.store.begin_partial, layer, lease)

    async def flush(self, partial: PartialBlob) -> Bitfield:
        """Make written pieces durable and present, group-committed with concurrent
        flushes of any partial blob; the present set."""
        return await self._flushes.submit(partial)

    def _flush_batch(self, partials: list[PartialBlob]) -> list[Bitfield | BaseException]:
        try:
            return list(self.store.flush_partials(partials))
        except Exception as exc:
            if len(partials) == 1:
                return [exc]
        # one blob's failure (say, collected under its writer) must not fail the others
        out: list[Bitfield | BaseException] = []
        for p in partials:
            try:
                out.append(p.flush())
            except Exception as exc:
                out.append(exc)
        return out

    async def close_partial(self, partial: PartialBlob) -> None:
        """Flush (group-committed) and close a partial blob."""
        await self.flush(partial)
        await self._run(self._io, partial.close)  # nothing left to flush: no database work

    async def add_bytes(self, data: Bytes, lease: LeaseId | None = None, *,
                        expected: BlobId | None = None) -> BlobInfo:
        """Add a (small) blob, group-committed with concurrent ``add_bytes`` calls: many
        small blobs cost one transaction.  With ``expected``, data that does not hash to it
        raises :class:`~blobmesh.errors.VerificationError` and is not stored.  ``data`` must
        stay unchanged until this returns."""
        return await self._adds.submit((data, lease, expected))

    async def add_verified(self, items: Sequence[tuple[Bytes, BlobId]],
                           lease: LeaseId | None = None) -> list[BlobInfo | VerificationError]:
        """Add ``(data, expected id)`` pairs in one transaction (one commit, one sync round),
        on an I/O thread; an item whose data does not hash to its id is not stored and its
        slot holds the VerificationError.  A failed commit raises (nothing stored)."""
        results = await self._run(self._io, self._add_batch,
                                  [(data, lease, expected) for data, expected in items])
        out: list[BlobInfo | VerificationError] = []
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, VerificationError):
                raise r
            out.append(r)
        return out

    def _add_batch(self, items: list[tuple[Bytes, LeaseId | None, BlobId | None]]
                   ) -> list[BlobInfo | BaseException]:
        out: dict[int, BlobInfo | BaseException] = {}
        by_lease: dict[LeaseId | None, list[int]] = {}
        for i, (data, lease, expected) in enumerate(items):
            if expected is not None and (actual := hash_bytes(data)) != expected:
                out[i] = VerificationError(f"data hashes to {actual.short()}, not "
                                           f"{expected.short()}", blob_id=expected)
            else:
                by_lease.setdefault(lease, []).append(i)
        for lease, indices in by_lease.items():
            try:
                infos: Sequence[BlobInfo | BaseException] = \
                    self.store.add_many([items[i][0] for i in indices], lease, inline=True)
            except Exception as exc:
                infos = [exc] * len(indices)
            for i, info in zip(indices, infos, strict=True):
                out[i] = info
        return [out[i] for i in range(len(items))]

    # --- data (the I/O threads) ------------------------------------------------------------

    async def add_many(self, sources: Iterable[AddSource], lease: LeaseId | None = None
                       ) -> list[BlobInfo]:
        """``Store.add_many`` (one transaction for all) on an I/O thread: hashing large
        inputs does not hold up the metadata thread."""
        return await self._run(self._io, self.store.add_many, list(sources), lease)

    async def verify(self, blob_id: BlobId, lease: LeaseId | None = None, *,
                     max_age: float = 0.0) -> bool:
        """``Store.verify`` on an I/O thread (a full rehash reads the whole blob)."""
        return await self._run(self._io, self.store.verify, blob_id, lease, max_age=max_age)

    async def read_small(self, blobs: Sequence[tuple[BlobId, int]], *, verify: bool
                         ) -> list[bytes | CorruptBlobError]:
        """Whole contents of complete blobs of known sizes (from :meth:`complete_sizes`),
        without leases, on an I/O thread: one blob's loss or rot is its slot's error."""
        return await self._run(self._io, self._read_small, blobs, verify)

    def _read_small(self, blobs: Sequence[tuple[BlobId, int]], verify: bool
                    ) -> list[bytes | CorruptBlobError]:
        out: list[bytes | CorruptBlobError] = []
        for blob_id, size in blobs:
            try:
                out.append(read_whole(self.store.db, self.store.layout, blob_id, size,
                                           verify=verify))
            except CorruptBlobError as exc:
                out.append(exc)
        return out

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run piece-data work on an I/O thread: ``PartialBlob.write_piece``,
        ``PieceReader.read``, ``BlobReader.read`` and their ``close``."""
        return await self._run(self._io, fn, *args)

    async def meta(self, fn: Callable[..., T], *args: Any) -> T:
        """Run any other metadata work (a ``Store`` method) on the metadata thread."""
        return await self._run(self._meta, fn, *args)


class GroupCommit(Generic[T, R]):
    """Runs ``commit(items)`` for whatever was submitted while the previous batch ran.

    ``commit`` returns one result (or exception) per item, in order, or raises for all.  One
    batch runs at a time, on ``pool``; after each one the next is submitted behind whatever
    else the pool was asked meanwhile, so batches never starve other work.
    """

    def __init__(self, pool: ThreadPoolExecutor,
                 commit: Callable[[list[T]], Sequence[R | BaseException]]) -> None:
        self._pool = pool
        self._commit = commit
        self._lock = threading.Lock()
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._running = False

    async def submit(self, item: T) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._queue.append((item, fut))
            start, self._running = not self._running, True
        if start:
            self._next()
        return await fut

    def _next(self) -> None:
        try:
            self._pool.submit(self._run)
        except RuntimeError as exc:  # the store is closed
            with self._lock:
                batch, self._queue, self._running = self._queue, [], False
            for _, fut in batch:
                _settle(fut, exc)

    def _run(self) -> None:
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            results: Sequence[R | BaseException] = self._commit([item for item, _ in batch])
        except Exception as exc:
            results = [exc] * len(batch)
        for (_, fut), result in zip(batch, results, strict=True):
            with suppress(RuntimeError):  # its loop is closed: nobody waits any more
                fut.get_loop().call_soon_threadsafe(_settle, fut, result)
        with self._lock:
            more = self._running = bool(self._queue)
        if more:
            self._next()


def _settle(fut: asyncio.Future[R], result: R | BaseException) -> None:
    if fut.done():  # the waiter was cancelled: an error must still be seen
        if isinstance(result, BaseException):
            log.warning("store batch failed after its caller gave up: %s", result,
                        exc_info=result)
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)
