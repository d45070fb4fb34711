"""Other members' stats for the rows the open pages show, without I/O: whom to ask now, which
answers to believe, and what a row says (``blobmesh.node.stats`` is the wire)."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from blobmesh.node.stats import MAX_ANSWER_BYTES, STATS_ASK, StatsAnswer, StatsAsk
from blobmesh.transport.identity import NodeId

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
