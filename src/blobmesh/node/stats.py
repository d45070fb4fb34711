"""A member's stats on request: whoever wants them (a dashboard, for the members its pages
show) sends ``STATS_ASK`` + ``[nonce]`` as a space notification, and the member answers for
itself with ``STATS_ANSWER`` + ``[nonce, store_bytes, store_blobs, uploaded, downloaded]``
(its swarm's byte counters since it started: the asker derives rates from two answers).

Nothing is sent unless asked, so stats cost nothing while nobody looks.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated

import msgspec

from blobmesh.errors import BlobmeshError
from blobmesh.space.space import Space
from blobmesh.store.aio import AsyncStore
from blobmesh.transport.identity import NodeId

STATS_ASK = b"ms?"
STATS_ANSWER = b"ms!"
MAX_ANSWER_BYTES = 64  # five msgpack integers below 2**63 and the array header fit in 46
MAX_ASK_BYTES = 16

Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class StatsAsk(msgspec.Struct, frozen=True, array_like=True):
    nonce: Count  # echoed by the answer: an answer nobody asked for is dropped


class StatsAnswer(msgspec.Struct, frozen=True, array_like=True):
    nonce: Count
    store_bytes: Count
    store_blobs: Count
    uploaded: Count  # bytes its swarm sent since it started
    downloaded: Count


class StatsResponder:
    """Answers members' ``STATS_ASK`` with this node's store usage and swarm counters: at most
    one answer per asker every ``min_gap`` seconds; store usage read at most every
    ``usage_every`` seconds (an asker cannot make the node scan its store more often)."""

    def __init__(self, space: Space, store: AsyncStore, counters: Callable[[], tuple[int, int]],
                 *, min_gap: float = 0.5, usage_every: float = 2.0, askers: int = 4096) -> None:
        self._space = space
        self._store = store
        self._counters = counters
        self._min_gap = min_gap
        self._usage_every = usage_every
        self._askers = askers
        self._answered: OrderedDict[NodeId, float] = OrderedDict()  # asker -> last answer
        self._usage = (0, 0)
        self._usage_at = float("-inf")
        self.answers = 0

    async def on_ask(self, peer: NodeId, data: bytes) -> None:
        now = time.monotonic()
        if len(data) > MAX_ASK_BYTES or not self._space.is_member(peer) or \
                now - self._answered.get(peer, float("-inf")) < self._min_gap:
            return
        try:
            ask = msgspec.msgpack.decode(data, type=StatsAsk)
        except msgspec.DecodeError:
            return
        self._answered[peer] = now
        self._answered.move_to_end(peer)
        while len(self._answered) > self._askers:
            self._answered.popitem(last=False)
        with contextlib.suppress(BlobmeshError, OSError):
            if now - self._usage_at >= self._usage_every:
                blobs = await self._store.blobs()
                self._usage = (sum(b.bytes_present for b in blobs),
                               sum(b.complete for b in blobs))
                self._usage_at = now
            up, down = self._counters()
            answer = StatsAnswer(ask.nonce, *self._usage, up, down)
            await self._space.send_notify(peer, STATS_ANSWER + msgspec.msgpack.encode(answer))
            self.answers += 1
