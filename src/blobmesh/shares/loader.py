"""Loading a blob from share URLs: tries with backoff, a deadline, verified pieces, resume."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AsyncExitStack, aclosing, suppress
from dataclasses import dataclass

from blobmesh.errors import (
    BadShareDataError,
    DeadlineExceededError,
    LoadFailedError,
    ShareError,
    ShareSourceError,
    VerificationError,
)
from blobmesh.hashing import BlobId, PieceLayer
from blobmesh.shares.manifest import (
    MAX_MANIFEST_BYTES,
    ShareManifest,
    data_path,
    manifest_path,
    pieces_path,
    resource_path,
    validate_resource_id,
)
from blobmesh.shares.metrics import ShareMetrics
from blobmesh.shares.sources import Source, SourceOptions, open_source
from blobmesh.store import Bitfield, BlobReader, LeaseId, PartialBlob, Store

LoadProgress = Callable[[int, int], None]
"""Called with (bytes present, blob size) as verified pieces arrive."""

MAX_BACKOFF = 60.0
# Bytes handed to the writer threads but not written yet: bounds memory, and is as large as
# the store's flush interval so the download goes on while a flushed batch is fsynced.
WRITE_WINDOW = 32 * 1024 * 1024
WRITE_THREADS = 2


@dataclass(frozen=True, slots=True)
class Attempt:
    """One failed try of one share URL."""

    url: str
    try_number: int
    error: ShareError

    @property
    def status(self) -> int | None:
        """The HTTP status, when the server answered with an unexpected one."""
        status = self.error.context.get("status")
        return status if isinstance(status, int) else None

    def __str__(self) -> str:
        return f"{self.url} (try {self.try_number}): {self.error}"


async def load_blob(store: Store, ref: BlobId | str, urls: Sequence[str], *,
                    max_tries: int = 3, retry_timeout: float = 1.0,
                    deadline: float | None = None, stall_timeout: float = 30.0,
                    lease: LeaseId | None = None, metrics: ShareMetrics | None = None,
                    progress: LoadProgress | None = None) -> BlobReader:
    """Load a blob (by id, or by the resource id a share maps to it) into ``store``.

    Each URL is the base of a served share directory.  The URLs are tried in turn, up to
    ``max_tries`` passes over the list, sleeping ``retry_timeout`` seconds (doubling, at most
    60 s) between passes; a URL failing to send a byte for ``stall_timeout`` seconds fails that
    try.  The manifest must match ``ref``, the piece layer the blob id and every piece its hash;
    verified pieces are kept, so later tries (and later loads) fetch only what is missing, with
    HTTP ``Range`` requests.  ``deadline`` is a :func:`time.monotonic` instant.

    Returns a reader of the complete blob, leased to ``lease``.  Raises
    :class:`LoadFailedError` listing every attempt, or :class:`DeadlineExceededError` (verified
    pieces kept for a resume).  Local failures (e.g. :class:`StoreFullError`) are raised at once.
    """
    if isinstance(ref, str):
        validate_resource_id(ref)
    if not urls:
        raise ShareError(f"no share URLs to load {_describe(ref)} from")
    if max_tries < 1:
        raise ShareError(f"max_tries must be at least 1, got {max_tries}")
    options = SourceOptions(stall_timeout=stall_timeout)
    sources = [open_source(url, options) for url in urls]
    metrics = metrics if metrics is not None else ShareMetrics()
    load = _Load(store, ref, lease or LeaseId.new("shares"), metrics, progress)
    started = time.monotonic()
    try:
        reader = await load.run_until(sources, max_tries, retry_timeout, deadline)
    except BaseException as exc:
        metrics.record_load(ok=False, deadline=isinstance(exc, DeadlineExceededError),
                            seconds=time.monotonic() - started)
        raise
    metrics.record_load(ok=True, deadline=False, seconds=time.monotonic() - started)
    return reader


def _describe(ref: BlobId | str) -> str:
    return str(ref) if isinstance(ref, BlobId) else f"resource {ref!r}"


def _runs(indices: list[int]) -> Iterator[tuple[int, int]]:
    """Group sorted piece indices into (first, last) runs of consecutive ones."""
    i = 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        yield indices[i], indices[j]
        i = j + 1


class _Load:
    """The state of one load across its tries: the resolved blob id and the partial blob."""

    def __init__(self, store: Store, ref: BlobId | str, lease: LeaseId, metrics: ShareMetrics,
                 progress: LoadProgress | None) -> None:
        self.store = store
        self.ref = ref
        self.lease = lease
        self.metrics = metrics
        self.progress = progress
        self.blob_id = ref if isinstance(ref, BlobId) else None
        self.attempts: list[Attempt] = []
        self.current: tuple[str, int] | None = None  # the try in progress: (url, try number)
        self.writer: _PieceWriter | None = None
        self.kept: Bitfield | None = None  # the pieces present once the partial is closed

    async def run_until(self, sources: list[Source], max_tries: int, retry_timeout: float,
                        deadline: float | None) -> BlobReader:
        loop = asyncio.get_running_loop()
        # the deadline is on the monotonic clock; the loop's clock may differ (uvloop)
        when = None if deadline is None else loop.time() + (deadline - time.monotonic())
        timeout = asyncio.timeout_at(when)
        try:
            async with AsyncExitStack() as stack:
                for source in sources:
                    stack.push_async_callback(source.aclose)
                stack.push_async_callback(self.close)
                async with timeout:
                    return await self.run(sources, max_tries, retry_timeout)
        except TimeoutError:
            if not timeout.expired():
                raise
            raise self.deadline_error() from None

    async def run(self, sources: list[Source], max_tries: int, retry_timeout: float
                  ) -> BlobReader:
        if self.blob_id is not None and await self.store.aio.has(self.blob_id):
            return await self.reader()
        for try_number in range(1, max_tries + 1):
            if try_number > 1:
                await asyncio.sleep(min(retry_timeout * 2 ** (try_number - 2), MAX_BACKOFF))
            for source in sources:
                self.current = (source.url, try_number)  # stays set if the deadline hits
                try:
                    await self.attempt(source)
                except ShareSourceError as exc:
                    self.current = None
                    self.attempts.append(Attempt(source.url, try_number, exc))
                    self.metrics.record_try(ok=False)
                    if self.writer is not None:
                        await self.writer.settle()
                    continue
                self.current = None
                self.metrics.record_try(ok=True)
                await self.close()
                return await self.reader()
        tries = "; ".join(map(str, self.attempts))
        raise LoadFailedError(f"could not load {_describe(self.ref)} from {len(sources)} share "
                              f"URL(s) in {len(self.attempts)} tries: {tries}",
                              ref=str(self.ref), attempts=self.attempts)

    async def attempt(self, source: Source) -> None:
        """Fetch every missing piece from ``source``; raises ShareSourceError on any fault."""
        manifest = await self.manifest(source)
        if self.writer is None:
            if await self.store.aio.has(manifest.blob_id):
                return
            path = pieces_path(manifest.blob_id)
            raw = await source.read(path, manifest.pieces_bytes)
            try:
                layer = PieceLayer.from_bytes(manifest.blob_id, manifest.size,
                                              manifest.piece_size, raw)
            except VerificationError as exc:
                raise BadShareDataError(f"{path}: {exc}", path=path) from exc
            partial = await self.store.aio.begin_partial(layer, self.lease)
            self.writer = _PieceWriter(partial)
        writer = self.writer
        layer = writer.partial.layer
        missing = writer.partial.missing()
        done = layer.size - sum(layer.piece_range(i)[1] for i in missing)
        if self.progress:
            self.progress(done, layer.size)
        for first, last in _runs(missing):
            done = await self.fetch(source, writer, first, last, done)
        await writer.drain()

    async def manifest(self, source: Source) -> ShareManifest:
        """The source's manifest for ``ref``, checked against what is already known."""
        ref = self.ref
        path = resource_path(ref) if isinstance(ref, str) else manifest_path(ref)
        manifest = ShareManifest.from_json(await source.read(path, MAX_MANIFEST_BYTES),
                                           where=path)
        if isinstance(ref, str) and manifest.resource_id != ref:
            raise BadShareDataError(f"{path} is the manifest of resource "
                                    f"{manifest.resource_id!r}", path=path)
        if self.blob_id is not None and manifest.blob_id != self.blob_id:
            # for a resource id, the first share that answered fixed the blob
            raise BadShareDataError(f"{path} is the manifest of blob {manifest.blob_id.short()}"
                                    f", expected {self.blob_id.short()}", path=path)
        self.blob_id = manifest.blob_id
        return manifest

    async def fetch(self, source: Source, writer: _PieceWriter, first: int, last: int,
                    done: int) -> int:
        """Stream pieces ``first..last`` into the writer; returns the new bytes-present count."""
        layer = writer.partial.layer
        start = layer.piece_range(first)[0]
        end = sum(layer.piece_range(last))
        if start == end:  # the one, empty piece of an empty blob
            await writer.submit(first, b"")
            return done
        index = first
        buf = bytearray(layer.piece_range(index)[1])
        fill = 0
        async with aclosing(source.read_range(data_path(layer.blob_id), start, end)) as chunks:
            async for chunk in chunks:
                self.metrics.record_bytes(len(chunk))
                view = memoryview(chunk)
                while view:
                    n = min(len(view), len(buf) - fill)
                    buf[fill : fill + n] = view[:n]
                    fill += n
                    view = view[n:]
                    if fill < len(buf):
                        continue
                    await writer.submit(index, buf)
                    done += len(buf)
                    if self.progress:
                        self.progress(done, layer.size)
                    index += 1
                    if index <= last:
                        buf, fill = bytearray(layer.piece_range(index)[1]), 0
        return done

    async def reader(self) -> BlobReader:
        assert self.blob_id is not None
        return await self.store.aio.get_reader(self.blob_id, self.lease)

    async def close(self) -> None:
        """Make written pieces durable and present (kept for a resume if incomplete)."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            await writer.close()
            self.kept = writer.partial.have

    def deadline_error(self) -> DeadlineExceededError:
        tries = list(map(str, self.attempts))
        if self.current is not None:
            url, number = self.current
            tries.append(f"{url} (try {number}): interrupted by the deadline")
        kept = self.kept
        pieces = "" if kept is None else f"; {kept.count()}/{kept.size} pieces kept for a resume"
        return DeadlineExceededError(
            f"deadline passed loading {_describe(self.ref)}{pieces}; tries: "
            f"{'; '.join(tries) or 'none'}", ref=str(self.ref), attempts=self.attempts)


class _PieceWriter:
    """Verifies and writes pieces on threads of its own, so hashing and the store's fsyncs
    overlap the download (two threads: one can write while the other waits for an fsync).

    :meth:`close` runs on a writer thread after every submitted write has finished, even when
    the load is cancelled half way.
    """

    def __init__(self, partial: PartialBlob) -> None:
        self.partial = partial
        self._executor = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="blobmesh-share")
        self._inflight: deque[tuple[Future[None], int]] = deque()
        self._inflight_bytes = 0

    async def submit(self, index: int, data: bytes | bytearray) -> None:
        while self._inflight and self._inflight_bytes + len(data) > WRITE_WINDOW:
            await self._pop()
        self._inflight.append((self._executor.submit(self._write, index, data), len(data)))
        self._inflight_bytes += len(data)

    async def drain(self) -> None:
        """Wait for every submitted piece; raises the first write's error."""
        while self._inflight:
            await self._pop()

    async def settle(self) -> None:
        """Wait for every submitted piece; those that failed verification stay missing."""
        while self._inflight:
            with suppress(BadShareDataError):
                await self._pop()

    async def _pop(self) -> None:
        future, nbytes = self._inflight.popleft()
        self._inflight_bytes -= nbytes
        await asyncio.wrap_future(future)

    def _write(self, index: int, data: bytes | bytearray) -> None:
        try:
            self.partial.write_piece(index, memoryview(data))
        except VerificationError as exc:
            path = data_path(self.partial.blob_id)
            raise BadShareDataError(f"{path}: {exc}", path=path, piece=index) from exc

    async def close(self) -> None:
        pending = [future for future, _ in self._inflight]
        self._inflight.clear()

        def close_after_writes() -> None:
            wait(pending)
            self.partial.close()

        done = self._executor.submit(close_after_writes)
        self._executor.shutdown(wait=False)
        # shielded: a cancelled load must still flush what it wrote before giving up
        await asyncio.shield(asyncio.wrap_future(done))
