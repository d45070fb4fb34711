"""The seed's callback-style service (Acki Nacki ``BlobSyncService``) over a worker loop."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from blobmesh.errors import ShareError
from blobmesh.hashing import BlobId
from blobmesh.shares.loader import load_blob
from blobmesh.shares.metrics import ShareMetrics
from blobmesh.shares.sharedir import ShareDir
from blobmesh.store import BlobReader, Store

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_Job = Callable[[], Coroutine[Any, Any, None]]


class ShareService:
    """Shares and loads blobs on a worker thread running its own event loop.

    ``share_blob`` and ``load_blob`` return at once; commands run concurrently on the worker and
    report through callbacks, which run on a pool thread (so they may block, e.g. read the
    whole blob).  :meth:`join` stops taking commands, lets the queued ones finish and stops the
    worker.  One :class:`ShareMetrics` counts everything the service does.
    """

    def __init__(self, store: Store, share_dir: str | os.PathLike[str] | None = None, *,
                 metrics: ShareMetrics | None = None) -> None:
        self.store = store
        self.metrics = metrics if metrics is not None else ShareMetrics()
        self.share_dir = None if share_dir is None else ShareDir(share_dir, self.metrics)
        self._loop = asyncio.new_event_loop()
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="blobmesh-shares", daemon=True)
        self._thread.start()

    def share_blob(self, resource_id: str | None, blob_id: BlobId,
                   on_complete: Callable[[Exception | None], object]) -> None:
        """Publish ``blob_id`` (under ``resource_id``); ``on_complete(None or the error)``."""
        share_dir = self.share_dir
        if share_dir is None:
            raise ShareError("this share service was started without a share directory")

        async def job() -> None:
            try:
                await self.store.aio.io(share_dir.share, self.store, blob_id, resource_id)
            except Exception as exc:
                await self._call(on_complete, exc)
            else:
                await self._call(on_complete, None)

        self._submit(job)

    def load_blob(self, ref: BlobId | str, urls: Sequence[str], *, max_tries: int = 3,
                  retry_timeout: float = 1.0, deadline: float | None = None,
                  stall_timeout: float = 30.0,
                  on_success: Callable[[BlobReader], object],
                  on_error: Callable[[Exception], object]) -> None:
        """Load a blob as :func:`~blobmesh.shares.load_blob` does.

        ``on_success(reader)`` gets a reader that is closed when it returns; ``on_error(exc)``
        gets the typed error (:class:`LoadFailedError`, :class:`DeadlineExceededError`, ...).
        """
        urls = list(urls)

        async def job() -> None:
            try:
                reader = await load_blob(self.store, ref, urls, max_tries=max_tries,
                                         retry_timeout=retry_timeout, deadline=deadline,
                                         stall_timeout=stall_timeout, metrics=self.metrics)
            except Exception as exc:
                await self._call(on_error, exc)
                return
            try:
                await self._call(on_success, reader)
            finally:
                await self.store.aio.io(reader.close)

        self._submit(job)

    def join(self, timeout: float | None = None) -> None:
        """Stop taking commands, finish the queued ones and stop the worker thread.

        Not to be called from a callback (the worker would wait for itself).
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                self._loop.call_soon_threadsafe(self._queue.put_nowait, None)
        self._thread.join(timeout)

    def __enter__(self) -> ShareService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.join()

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._closed:
                raise ShareError("the share service has been shut down (join)")
            self._loop.call_soon_threadsafe(self._queue.put_nowait, job)

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=lambda: self._loop) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        # Jobs report every failure through their callbacks, so none ends the group early.
        async with asyncio.TaskGroup() as group:
            while (job := await self._queue.get()) is not None:
                group.create_task(job())

    @staticmethod
    async def _call(callback: Callable[[_T], object], arg: _T) -> None:
        try:
            await asyncio.to_thread(callback, arg)
        except Exception:
            # a caller's bug must not stop the service or other commands
            log.exception("share service callback %r failed", callback)
