"""A member's stats on request: whoever wants them (a dashboard, for the members its pages
show; ``blobmesh top``, for those on its screen) sends ``STATS_ASK`` + ``[nonce]`` as a space
notification, and the member answers for itself with ``STATS_ANSWER`` + ``[nonce,
store_bytes, store_blobs, uploaded, downloaded]`` (its swarm's byte counters since it started:
the asker derives rates from two answers).

Nothing is sent unless asked, so stats cost nothing while nobody looks.  Every node answers
(:class:`StatsResponder`) and asks on behalf of its viewers (:class:`StatsAsker`, whose
policy, sans I/O, is :class:`MemberStats`).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from blobmesh.errors import BlobmeshError
from blobmesh.space.space import Space
from blobmesh.store.aio import AsyncStore
from blobmesh.tasks import TaskOwner
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


OK, ASKING, UNKNOWN = "ok", "asking", "unknown"


@dataclass(slots=True)
class _Member:
    asked_at: float = float("-inf")
    since: float = float("-inf")  # asked without a break since (how long it has not answered)
    nonce: int = -1  # of the request still unanswered, -1 if none
    answer: StatsAnswer | None = None
    answered_at: float | None = None
    up: float | None = None
    down: float | None = None


class MemberStats:
    """Asks each shown member at most every ``every`` seconds; an answer counts only from the
    member it was asked of, with the nonce of its latest request, decoded within bounds (so a
    member speaks for itself only, once per request).  Answers older than ``stale_after`` are
    shown as unknown; members not shown for ``forget_after`` are forgotten."""

    def __init__(self, every: float = 2.0, stale_after: float = 6.0, forget_after: float = 60.0,
                 rng: random.Random | None = None) -> None:
        self.every = every
        self.stale_after = stale_after
        self.forget_after = forget_after
        self._rng = rng or random.SystemRandom()
        self._members: dict[NodeId, _Member] = {}

    def due(self, shown: Iterable[NodeId], now: float) -> list[tuple[NodeId, bytes]]:
        """The requests to send now (node, notification) to the members ``shown``."""
        out = []
        for node in shown:
            m = self._members.setdefault(node, _Member())
            if now - m.asked_at < self.every:
                continue
            if now - m.asked_at > self.stale_after:
                m.since = now  # shown again after a break: a fresh wait for its answer
            m.asked_at, m.nonce = now, self._rng.getrandbits(63)
            out.append((node, STATS_ASK + msgspec.msgpack.encode(StatsAsk(m.nonce))))
        for node in [n for n, m in self._members.items()
                     if now - m.asked_at > self.forget_after]:
            del self._members[node]
        return out

    def answered(self, sender: NodeId, data: bytes, now: float) -> bool:
        """Take ``sender``'s answer (the notification after its prefix); False if dropped."""
        m = self._members.get(sender)
        if m is None or m.nonce < 0 or len(data) > MAX_ANSWER_BYTES:
            return False
        try:
            a = msgspec.msgpack.decode(data, type=StatsAnswer)
        except msgspec.DecodeError:
            return False
        if a.nonce != m.nonce:
            return False
        m.nonce = -1
        prev, at = m.answer, m.answered_at
        if prev is not None and at is not None and now > at and \
                a.uploaded >= prev.uploaded and a.downloaded >= prev.downloaded:
            m.up = (a.uploaded - prev.uploaded) / (now - at)
            m.down = (a.downloaded - prev.downloaded) / (now - at)
        else:  # a first answer, or its counters went back (it restarted)
            m.up = m.down = None
        m.answer, m.answered_at = a, now
        return True

    def row(self, node: NodeId, now: float) -> dict[str, Any]:
        """A fleet row's stats: ``stats`` is ``ok`` (values current), ``asking`` (no answer
        yet), ``unknown`` (no recent answer; ``stats_seen`` is the last one's time, if any)
        or None (never asked: not shown)."""
        m = self._members.get(node)
        row: dict[str, Any] = {"store_bytes": None, "store_blobs": None, "up": None,
                               "down": None, "stats": None, "stats_seen": None}
        if m is None:
            return row
        row["stats_seen"] = m.answered_at
        if m.answer is not None and m.answered_at is not None and \
                now - m.answered_at <= self.stale_after:
            row.update(store_bytes=m.answer.store_bytes, store_blobs=m.answer.store_blobs,
                       up=m.up, down=m.down, stats=OK)
        elif m.answered_at is None and now - m.since < self.stale_after:
            row["stats"] = ASKING
        else:
            row["stats"] = UNKNOWN
        return row


class StatsAsker:
    """Asks members for their stats on behalf of whoever shows them (the dashboard's pages,
    ``blobmesh top`` through the control API): one request in flight per member, at most
    every ``MemberStats.every`` seconds whoever asks; answers from non-members are dropped.
    Times are wall-clock seconds (``stats_seen`` is shown as a time)."""

    def __init__(self, space: Space, tasks: TaskOwner) -> None:
        self._space = space
        self._tasks = tasks
        self.stats = MemberStats()
        self._asking: set[NodeId] = set()  # requests being sent

    def ask(self, shown: Iterable[NodeId], now: float) -> None:
        """``shown`` are on some screen now: ask those due."""
        for node, data in self.stats.due((n for n in shown if n not in self._asking), now):
            self._asking.add(node)
            self._tasks.spawn(self._send(node, data), name="stats-ask")

    async def _send(self, node: NodeId, data: bytes) -> None:
        try:
            await self._space.send_notify(node, data)
        except (BlobmeshError, OSError):
            pass  # it shows as unknown: that is the news
        finally:
            self._asking.discard(node)

    def on_answer(self, sender: NodeId, data: bytes) -> None:
        if self._space.is_member(sender):
            self.stats.answered(sender, data, time.time())

    def row(self, node: NodeId, now: float) -> dict[str, Any]:
        return self.stats.row(node, now)
