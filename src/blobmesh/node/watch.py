"""The node's view of change, sans I/O: when to redial its peers, and what changed between two
snapshots of its space and distributions (the lines it logs).

The daemon feeds snapshots and the clock in; nothing here sleeps, dials or logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from blobmesh.distribution.model import DistributionState, DistributionStatus, TargetState
from blobmesh.transport import NodeId


class RejoinPolicy:
    """Redial remembered peers and bootstrap tickets while fewer than ``want`` peers are alive.

    The first check is due at once; after each redial the delay doubles from ``base`` up to
    ``cap``, and it starts over from ``base`` once the node has the peers it wants.
    """

    def __init__(self, want: int, *, base: float = 1.0, cap: float = 30.0,
                 now: float = 0.0) -> None:
        self.want = want
        self.base = base
        self.cap = cap
        self._delay = base
        self._due = now

    def get_timer(self) -> float:
        """When :meth:`handle_timer` is next due (loop clock)."""
        return self._due

    def handle_timer(self, now: float, alive: int, known: int) -> bool:
        """Whether to redial now, given ``alive`` peers and ``known`` tickets to dial."""
        if alive >= min(self.want, known):
            self._delay = self.base
            self._due = now + self.base
            return False
        self._due = now + self._delay
        self._delay = min(self.cap, self._delay * 2)
        return True


@dataclass(frozen=True, slots=True)
class PeerView:
    """What the node last saw of one peer."""

    alive: bool
    left: bool = False  # its last record is a tombstone (said goodbye)


def peer_changes(before: Mapping[NodeId, PeerView], after: Mapping[NodeId, PeerView]
                 ) -> list[tuple[str, NodeId]]:
    """Membership events between two snapshots: ``joined``, ``suspect`` (stopped answering),
    ``alive`` (answers again), ``left`` (said goodbye) and ``dead`` (record gone without one).

    A node in ``after`` with ``left`` set counts as gone; one first seen not answering (a
    record remembered from an earlier run) is news only once it answers."""
    events: list[tuple[str, NodeId]] = []
    for node, now in after.items():
        was = before.get(node)
        if now.left:
            if was is not None and not was.left:
                events.append(("left", node))
        elif was is None or was.left:
            if now.alive:
                events.append(("joined", node))
        elif was.alive and not now.alive:
            events.append(("suspect", node))
        elif not was.alive and now.alive:
            events.append(("alive", node))
    events += [("dead", node) for node, was in before.items()
               if node not in after and not was.left]
    return events


def distribution_changes(before: Mapping[str, DistributionStatus],
                         after: Mapping[str, DistributionStatus], me: NodeId) -> list[str]:
    """One log line per distribution that appeared, per target that finished and per
    distribution that finished between two snapshots (keyed by handle)."""
    lines: list[str] = []
    for handle, s in after.items():
        was = before.get(handle)
        if was is None:
            what = f"blob {s.blob_id} ({s.size} bytes) to {s.scope} [{s.priority}]"
            if s.target(me) is not None:
                lines.append(f"distribution {handle} received: {what}")
            else:
                lines.append(f"distribution {handle} started: {what}, {s.total} target(s)")
        old = {t.node: t.state for t in was.targets} if was is not None else {}
        for t in s.targets:
            if t.state.final and old.get(t.node) is not t.state:
                reason = f": {t.reason}" if t.reason and t.state is not TargetState.COMPLETED \
                    else ""
                lines.append(f"distribution {handle} target {t.node.short()} {t.state}{reason}")
        if s.done and (was is None or not was.done):
            lines.append(_finished_line(handle, s))
    return lines


def _finished_line(handle: str, s: DistributionStatus) -> str:
    counts = f"{s.completed}/{s.total} target(s) completed"
    if s.state is DistributionState.FINISHED_WITH_FAILURES:
        reasons = "; ".join(f"{t.node.short()}: {t.reason or 'no reason given'}"
                            for t in s.targets if t.state is TargetState.FAILED)
        return f"distribution {handle} failed: {counts}, {s.failed} failed ({reasons})"
    return f"distribution {handle} {s.state}: {counts}"
