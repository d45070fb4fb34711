"""The node's sans-I/O change detection: rejoin backoff, membership and distribution diffs."""

from __future__ import annotations

import time

from blobmesh.distribution.model import (
    DistributionHandle,
    DistributionState,
    DistributionStatus,
    Priority,
    Scope,
    TargetState,
    TargetStatus,
)
from blobmesh.hashing import hash_bytes
from blobmesh.node.watch import PeerView, RejoinPolicy, distribution_changes, peer_changes
from blobmesh.transport import Identity


def test_rejoin_backs_off_while_alone_and_resets_when_it_has_peers() -> None:
    p = RejoinPolicy(want=2, base=1.0, cap=4.0, now=10.0)
    assert p.get_timer() == 10.0  # due at once
    dues = []
    for _ in range(4):
        assert p.handle_timer(p.get_timer(), alive=0, known=3)
        dues.append(p.get_timer())
    assert dues == [11.0, 13.0, 17.0, 21.0]  # 1, 2, 4, then capped at 4
    assert not p.handle_timer(21.0, alive=2, known=3)
    assert p.get_timer() == 22.0
    assert p.handle_timer(22.0, alive=1, known=3)
    assert p.get_timer() == 23.0  # the backoff started over
    assert not p.handle_timer(23.0, alive=1, known=1)  # all it knows is alive: enough


def test_peer_changes_name_each_transition() -> None:
    a, b, c, d, e = (Identity.generate().node_id for _ in range(5))
    before = {a: PeerView(True), b: PeerView(True), c: PeerView(False), d: PeerView(True)}
    after = {a: PeerView(False), c: PeerView(True), d: PeerView(False, left=True),
             e: PeerView(True)}
    assert set(peer_changes(before, after)) == {
        ("suspect", a), ("alive", c), ("left", d), ("joined", e), ("dead", b)}
    assert peer_changes(after, after) == []
    assert peer_changes({}, {a: PeerView(False)}) == []  # remembered, not answering yet
    assert peer_changes({a: PeerView(False)}, {a: PeerView(True)}) == [("alive", a)]
    back = peer_changes({d: PeerView(False, left=True)}, {d: PeerView(True)})
    assert back == [("joined", d)]  # a node that left and came back


def _status(handle: DistributionHandle, *targets: TargetStatus,
            state: DistributionState = DistributionState.ACTIVE) -> DistributionStatus:
    return DistributionStatus(handle, hash_bytes(b"x"), 1, Scope.all(), Priority.NORMAL, state,
                              targets, time.time())


def test_distribution_changes_log_start_target_outcomes_and_the_end() -> None:
    me, t1, t2 = (Identity.generate().node_id for _ in range(3))
    h = DistributionHandle.new()
    pending = _status(h, TargetStatus(t1), TargetStatus(t2))
    assert distribution_changes({}, {str(h): pending}, me) == [
        f"distribution {h} started: blob {pending.blob_id} (1 bytes) to all [normal], "
        "2 target(s)"]
    done = _status(h, TargetStatus(t1, TargetState.COMPLETED),
                   TargetStatus(t2, TargetState.FAILED, reason="disk full"),
                   state=DistributionState.FINISHED_WITH_FAILURES)
    assert distribution_changes({str(h): pending}, {str(h): done}, me) == [
        f"distribution {h} target {t1.short()} completed",
        f"distribution {h} target {t2.short()} failed: disk full",
        f"distribution {h} failed: 1/2 target(s) completed, 1 failed ({t2.short()}: disk full)"]
    assert distribution_changes({str(h): done}, {str(h): done}, me) == []
    mine = _status(h, TargetStatus(me))
    assert distribution_changes({}, {str(h): mine}, me)[0].startswith(
        f"distribution {h} received: blob")
