"""Subscriptions to a space's ops: bounded async iterators that resume from a cursor."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from blobmesh.errors import SpaceLimitError
from blobmesh.space.metrics import Metrics
from blobmesh.space.records import Op
from blobmesh.space.store import OpStore


class Subscription:
    """An async iterator over ops of some kinds (or all) in the order they were stored, bounded.

    :attr:`cursor` is the arrival number of the last op it yielded: ``Space.subscribe(kinds,
    after=sub.cursor)`` resumes after it, first replaying the stored ops that arrived since
    (cursors are valid while the space is open).  If the consumer falls more than
    ``subscriber_queue`` ops behind, iteration raises :class:`SpaceLimitError`
    (``limit_subscriber``) instead of silently skipping ops; resubscribing from the cursor
    reads the gap.
    """

    def __init__(self, ops: OpStore, kinds: frozenset[str] | None, maxsize: int,
                 after: int | None, metrics: Metrics, on_close: Callable[[Subscription], None]
                 ) -> None:
        self._ops = ops
        self.kinds = kinds
        self._maxsize = maxsize
        self._metrics = metrics
        self._on_close = on_close
        self._queue: asyncio.Queue[tuple[int, Op] | None] = asyncio.Queue(maxsize)
        self._overflowed = False
        last = ops.last_seq
        self.cursor = last if after is None else after
        # while replaying, ops read from the store; live offers are in it already
        self._replayed: int | None = self.cursor if self.cursor < last else None

    def offer(self, seq: int, op: Op) -> None:
        """``op`` was stored as number ``seq``."""
        if self._overflowed or self._replayed is not None:
            return
        try:
            self._queue.put_nowait((seq, op))
        except asyncio.QueueFull:
            self._overflowed = True
            self._metrics.limit("subscriber")

    def _replay(self) -> None:
        assert self._replayed is not None
        page = self._ops.after(self._replayed, self.kinds, self._maxsize)
        for item in page:
            self._queue.put_nowait(item)
        if page:
            self._replayed = page[-1][0]
        if len(page) < self._maxsize:
            self._replayed = None  # caught up: what is stored from now on is offered

    def close(self) -> None:
        self._on_close(self)
        self._replayed = None
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[Op]:
        return self

    async def __anext__(self) -> Op:
        if self._replayed is not None and self._queue.empty():
            self._replay()
        if self._overflowed and self._queue.empty():
            raise SpaceLimitError("subscriber fell behind; resubscribe with after=cursor")
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        self.cursor = item[0]
        return item[1]
