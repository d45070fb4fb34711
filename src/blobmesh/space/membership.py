"""Membership as a sans-I/O core: who answers (SWIM), the seeds, the periodic rounds.

Events (a record arrived or expired, a message or an ack came in, a link broke) and ``now`` go
in; :class:`~blobmesh.space.swim.Probe`, :class:`~blobmesh.space.swim.ProbeVia`,
:class:`~blobmesh.space.swim.Unresponsive`, :class:`~blobmesh.space.swim.Alive`,
:class:`Maintain` and :class:`BootstrapRound` come out of :meth:`Membership.handle_timer`,
due at :meth:`Membership.get_timer`.  Times are the caller's monotonic clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blobmesh.space.swim import Alive, Effect, FailureDetector, Probe, ProbeVia, Unresponsive

if TYPE_CHECKING:  # annotations only: node ids and settings are opaque values here
    from blobmesh.space.config import Seed, Timing
    from blobmesh.space.metrics import Metrics
    from blobmesh.transport.identity import NodeId


@dataclass(slots=True)
class PeerMeta:
    """What we observed of a peer (not signed, never gossiped)."""

    last_seen: float = 0.0  # wall-clock seconds
    failures: int = 0
    backoff_until: float = 0.0
    unresponsive: bool = False


@dataclass(frozen=True, slots=True)
class Maintain:
    """Expire records, prune old ops, flush peer meta, re-sign our record if it is due."""


@dataclass(frozen=True, slots=True)
class BootstrapRound:
    """Put our record to the bootstrap servers and read a sample of theirs."""


Action = Probe | ProbeVia | Unresponsive | Alive | Maintain | BootstrapRound


class Membership:
    """The failure detector over the members, the seeds to contact, and the round timers."""

    def __init__(self, timing: Timing, *, max_seeds: int, bootstrap: bool, rng: random.Random,
                 metrics: Metrics) -> None:
        self._t = timing
        self._max_seeds = max_seeds
        self._bootstrap = bootstrap
        self._metrics = metrics
        self.detector = FailureDetector(
            probe_interval=timing.probe_interval, probe_timeout=timing.probe_timeout,
            indirect_timeout=timing.indirect_timeout, indirect_probes=timing.indirect_probes,
            backoff_max=timing.unresponsive_backoff_max, rng=rng,
            suspicion_timeout=timing.suspicion_timeout)
        self.seeds: dict[NodeId, Seed] = {}
        self._next_maintain = float("inf")
        self._next_bootstrap = float("inf")

    def start(self, now: float) -> None:
        """The first rounds are one interval from ``now``."""
        self._next_maintain = now + self._t.maintenance_interval
        if self._bootstrap:
            self._next_bootstrap = now + self._t.bootstrap_interval

    # --- events ------------------------------------------------------------------------------

    def add_seed(self, seed: Seed) -> bool:
        """Contact ``seed`` until its record arrives; False if ``max_seeds`` are known."""
        if seed.node_id not in self.seeds and len(self.seeds) >= self._max_seeds:
            self._metrics.limit("seeds")  # e.g. a flood of spoofed LAN announcements
            return False
        self.seeds[seed.node_id] = seed
        return True

    def joined(self, node: NodeId) -> None:
        """``node`` holds a current record: probe it; it is no longer just a seed."""
        self.detector.add(node)
        self.seeds.pop(node, None)

    def left(self, node: NodeId) -> None:
        """``node``'s record is gone (tombstone or expiry)."""
        self.detector.remove(node)

    def heard_from(self, node: NodeId) -> list[Effect]:
        return self.detector.heard_from(node)

    def acked(self, node: NodeId, seq: int) -> list[Effect]:
        return self.detector.on_ack(node, seq)

    def link_lost(self, node: NodeId) -> None:
        self.detector.suspect(node)

    def is_unresponsive(self, node: NodeId) -> bool:
        return self.detector.is_unresponsive(node)

    # --- timers ------------------------------------------------------------------------------

    def get_timer(self) -> float:
        return min(self.detector.get_timer(), self._next_maintain, self._next_bootstrap)

    def handle_timer(self, now: float) -> list[Action]:
        out: list[Action] = list(self.detector.tick(now))
        if now >= self._next_maintain:
            self._next_maintain = now + self._t.maintenance_interval
            out.append(Maintain())
        if now >= self._next_bootstrap:
            self._next_bootstrap = now + self._t.bootstrap_interval
            out.append(BootstrapRound())
        return out
