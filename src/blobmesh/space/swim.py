"""SWIM-style failure detection as a sans-I/O state machine driven by a clock.

Each protocol period one member (round-robin over a shuffled order) is probed directly; if no
ack arrives within ``probe_timeout``, ``k`` other members are asked to probe it
(ping-req); if none acks within ``indirect_timeout`` it is *suspected*: one more ping waits
``suspicion_timeout`` for its ack (a node whose event loop is starved for seconds answers
late, not never), and only then is it marked unresponsive.  A member is therefore marked at
most ``2 * members * probe_interval + probe_timeout + indirect_timeout + suspicion_timeout``
after it stops answering, and at once (plus the timeouts) when the transport reports a broken
link (:meth:`FailureDetector.suspect`).  Unresponsive members keep being probed with an
exponential backoff (without the suspicion period), and come back on any ack.

Like Lifeguard's local health awareness, a late tick (our own event loop was starved) moves
pending deadlines by the lateness: an ack we had no chance to process is not silence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # node ids are opaque keys here (the transport package is I/O)
    from blobmesh.transport.identity import NodeId


@dataclass(frozen=True, slots=True)
class Probe:
    """Send a ping to ``target`` and wait ``timeout`` for its ack; report an ack with
    :meth:`FailureDetector.on_ack`."""

    target: NodeId
    seq: int
    timeout: float


@dataclass(frozen=True, slots=True)
class ProbeVia:
    """Ask each of ``via`` to ping ``target``; report any ack with ``on_ack``."""

    target: NodeId
    via: tuple[NodeId, ...]
    seq: int


@dataclass(frozen=True, slots=True)
class Unresponsive:
    target: NodeId


@dataclass(frozen=True, slots=True)
class Alive:
    """A member marked unresponsive answered again."""

    target: NodeId


Effect = Probe | ProbeVia | Unresponsive | Alive


DIRECT, INDIRECT, SUSPECTED = 0, 1, 2  # the stages of a probe


@dataclass(slots=True)
class _Pending:
    seq: int
    deadline: float
    stage: int = DIRECT


class FailureDetector:
    """Chooses whom to probe and when, and decides who is unresponsive."""

    def __init__(self, *, probe_interval: float, probe_timeout: float, indirect_timeout: float,
                 indirect_probes: int, backoff_max: float, rng: random.Random,
                 suspicion_timeout: float = 0.0) -> None:
        self._interval = probe_interval
        self._timeout = probe_timeout
        self._indirect_timeout = indirect_timeout
        self._suspicion = suspicion_timeout
        self._k = indirect_probes
        self._backoff_max = backoff_max
        self._rng = rng
        self._members: set[NodeId] = set()
        self._order: list[NodeId] = []
        self._pending: dict[NodeId, _Pending] = {}
        self._suspects: set[NodeId] = set()
        self._down: dict[NodeId, tuple[float, float]] = {}  # -> (retry at, backoff)
        self._next_probe = 0.0
        self._seq = 0
        self._last_tick: float | None = None

    def add(self, node: NodeId) -> None:
        self._members.add(node)

    def remove(self, node: NodeId) -> None:
        self._members.discard(node)
        self._pending.pop(node, None)
        self._suspects.discard(node)
        self._down.pop(node, None)

    def is_unresponsive(self, node: NodeId) -> bool:
        return node in self._down

    def suspect(self, node: NodeId) -> None:
        """Probe ``node`` at the next tick (e.g. its link just broke)."""
        if node in self._members and node not in self._down:
            self._suspects.add(node)

    def _start(self, target: NodeId, now: float) -> Probe:
        self._seq += 1
        self._pending[target] = _Pending(self._seq, now + self._timeout)
        return Probe(target, self._seq, self._timeout)

    def _next_target(self) -> NodeId | None:
        for _ in range(2):
            while self._order:
                n = self._order.pop()
                if n in self._members and n not in self._pending and n not in self._down:
                    return n
            self._order = list(self._members)
            self._rng.shuffle(self._order)
        return None

    def get_timer(self) -> float:
        """When :meth:`tick` has work next: a deadline, a due probe, a suspect to probe.

        Never more than ``probe_interval / 2`` after the last tick, so that only a timer
        that fires much later than asked counts as starvation.
        """
        last = self._last_tick
        if last is None or self._suspects:
            return last or 0.0
        due = [self._next_probe, last + self._interval / 2]
        due.extend(p.deadline for p in self._pending.values())
        due.extend(retry for n, (retry, _) in self._down.items() if n not in self._pending)
        return min(due)

    def tick(self, now: float) -> list[Effect]:
        """Advance to ``now``: time out pending probes and start due ones.

        Call it at :meth:`get_timer` (or more often); a gap longer than ``probe_interval``
        counts as local starvation and postpones pending deadlines.
        """
        out: list[Effect] = []
        if self._last_tick is not None and now - self._last_tick > self._interval:
            for p in self._pending.values():
                p.deadline += now - self._last_tick
        self._last_tick = now
        for target, p in list(self._pending.items()):
            if now < p.deadline:
                continue
            if p.stage == DIRECT:
                helpers = [m for m in self._members
                           if m != target and m not in self._down]
                if helpers:
                    via = tuple(self._rng.sample(helpers, min(self._k, len(helpers))))
                    p.stage, p.deadline = INDIRECT, now + self._indirect_timeout
                    out.append(ProbeVia(target, via, p.seq))
                    continue
            if p.stage != SUSPECTED and self._suspicion > 0 and target not in self._down:
                p.stage, p.deadline = SUSPECTED, now + self._suspicion
                out.append(Probe(target, p.seq, self._suspicion))
                continue
            del self._pending[target]
            old = self._down.get(target)
            backoff = min(self._backoff_max, old[1] * 2) if old else self._interval
            self._down[target] = (now + backoff, backoff)
            if old is None:
                out.append(Unresponsive(target))
        for target in sorted(self._suspects):
            if target not in self._pending and target in self._members:
                out.append(self._start(target, now))
        self._suspects.clear()
        # unresponsive members are re-probed on their own backoff schedule, not round-robin
        for target, (retry_at, _) in list(self._down.items()):
            if retry_at <= now and target not in self._pending:
                out.append(self._start(target, now))
        if now >= self._next_probe:
            self._next_probe = now + self._interval
            nxt = self._next_target()
            if nxt is not None:
                out.append(self._start(nxt, now))
        return out

    def set_deadline(self, target: NodeId, seq: int, deadline: float) -> None:
        """Move the direct-probe deadline of probe ``seq`` (connection setup is not silence:
        the I/O layer extends it while dialing, restarts it once connected, and ends it at once
        when the dial failed)."""
        p = self._pending.get(target)
        if p is not None and p.seq == seq and p.stage == DIRECT:
            p.deadline = deadline

    def on_ack(self, target: NodeId, seq: int) -> list[Effect]:
        """An ack for probe ``seq`` (direct or indirect) arrived."""
        p = self._pending.get(target)
        if p is None or p.seq != seq:
            return []
        del self._pending[target]
        return self.heard_from(target)

    def heard_from(self, node: NodeId) -> list[Effect]:
        """Any authenticated message from ``node`` proves it is alive."""
        if self._down.pop(node, None) is not None and node in self._members:
            return [Alive(node)]
        return []
