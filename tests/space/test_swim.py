"""The failure detector under a virtual clock: no sockets, no sleeping."""

from __future__ import annotations

import random

from blobmesh.space.swim import Alive, FailureDetector, Probe, ProbeVia, Unresponsive
from blobmesh.transport.identity import Identity, NodeId

INTERVAL, TIMEOUT, INDIRECT = 1.0, 0.3, 0.6


def detector(n: int) -> tuple[FailureDetector, list[NodeId]]:
    fd = FailureDetector(probe_interval=INTERVAL, probe_timeout=TIMEOUT,
                         indirect_timeout=INDIRECT, indirect_probes=3, backoff_max=8.0,
                         rng=random.Random(1))
    nodes = [Identity.generate().node_id for _ in range(n)]
    for node in nodes:
        fd.add(node)
    return fd, nodes


def run(fd: FailureDetector, dead: set[NodeId], until: float, step: float = 0.1,
        ) -> list[tuple[float, object]]:
    """Drive the detector; live members ack probes (direct or via helpers) at once."""
    seen: list[tuple[float, object]] = []
    t = 0.0
    while t <= until:
        for eff in fd.tick(t):
            seen.append((t, eff))
            if isinstance(eff, Probe | ProbeVia) and eff.target not in dead:
                seen.extend((t, e) for e in fd.on_ack(eff.target, eff.seq))
        t = round(t + step, 6)
    return seen


def test_every_member_is_probed_once_per_round() -> None:
    fd, nodes = detector(5)
    probes = [e.target for _, e in run(fd, set(), 4.95) if isinstance(e, Probe)]
    assert sorted(probes) == sorted(nodes)


def test_dead_member_is_marked_within_the_bound() -> None:
    fd, nodes = detector(6)
    dead = nodes[3]
    seen = run(fd, {dead}, 20.0)
    marks = [(t, e) for t, e in seen if isinstance(e, Unresponsive)]
    assert [e.target for _, e in marks] == [dead]  # exactly once, nobody else
    bound = 2 * len(nodes) * INTERVAL + TIMEOUT + INDIRECT
    assert marks[0][0] <= bound
    via = [e for _, e in seen if isinstance(e, ProbeVia)]
    assert via and all(dead not in e.via and len(e.via) == 3 for e in via)
    assert fd.is_unresponsive(dead)


def test_indirect_ack_saves_a_member() -> None:
    fd, nodes = detector(3)
    target = nodes[0]
    fd.suspect(target)
    (probe,) = [e for e in fd.tick(0.0) if isinstance(e, Probe) and e.target == target]
    effects = fd.tick(TIMEOUT)
    (via,) = [e for e in effects if isinstance(e, ProbeVia) and e.target == target]
    assert fd.on_ack(target, via.seq) == []
    later = fd.tick(TIMEOUT + INDIRECT + 0.01)
    assert Unresponsive(target) not in later
    assert not fd.is_unresponsive(target)
    assert probe.seq == via.seq


def suspicious(n: int, suspicion: float) -> tuple[FailureDetector, list[NodeId]]:
    fd = FailureDetector(probe_interval=INTERVAL, probe_timeout=TIMEOUT,
                         indirect_timeout=INDIRECT, indirect_probes=3, backoff_max=8.0,
                         rng=random.Random(1), suspicion_timeout=suspicion)
    nodes = [Identity.generate().node_id for _ in range(n)]
    for node in nodes:
        fd.add(node)
    return fd, nodes


def test_a_member_answering_late_is_suspected_not_marked() -> None:
    """A CPU-starved node answers seconds late: the last ping waits the suspicion period."""
    fd, nodes = suspicious(4, 4.0)
    target = nodes[0]
    fd.suspect(target)
    (probe,) = [e for e in fd.tick(0.0) if isinstance(e, Probe) and e.target == target]
    assert probe.timeout == TIMEOUT
    assert any(isinstance(e, ProbeVia) for e in fd.tick(TIMEOUT))
    (last,) = [e for e in fd.tick(TIMEOUT + INDIRECT) if isinstance(e, Probe)
               and e.target == target]
    assert last == Probe(target, probe.seq, 4.0)
    assert not any(isinstance(e, Unresponsive) for e in fd.tick(TIMEOUT + INDIRECT + 3.0))
    assert fd.on_ack(target, last.seq) == []  # 3 s late, inside the period
    assert not any(isinstance(e, Unresponsive) for e in fd.tick(TIMEOUT + INDIRECT + 5.0))
    assert not fd.is_unresponsive(target)


def test_a_silent_member_is_marked_when_the_suspicion_period_ends() -> None:
    fd, nodes = suspicious(4, 4.0)
    dead = nodes[0]
    fd.suspect(dead)
    seen = run(fd, {dead}, 12.0)
    marks = [t for t, e in seen if e == Unresponsive(dead)]
    assert marks and TIMEOUT + INDIRECT + 4.0 <= marks[0] <= TIMEOUT + INDIRECT + 4.0 + 0.11
    # once marked, re-probes go straight to ping-req and back off: no second suspicion
    later = [e for t, e in seen if isinstance(e, Probe) and e.target == dead and t > marks[0]]
    assert later and all(e.timeout == TIMEOUT for e in later)
    assert len(marks) == 1


def test_suspect_is_probed_at_once_and_comes_back() -> None:
    fd, nodes = detector(4)
    target = nodes[2]
    fd.suspect(target)
    assert any(isinstance(e, Probe) and e.target == target for e in fd.tick(0.0))
    seen = run(fd, {target}, 1.5)
    assert any(isinstance(e, Unresponsive) for _, e in seen)
    assert fd.heard_from(target) == [Alive(target)]
    assert not fd.is_unresponsive(target)


def test_stale_ack_is_ignored() -> None:
    fd, _ = detector(1)
    (probe,) = fd.tick(0.0)
    assert isinstance(probe, Probe)
    assert fd.on_ack(probe.target, probe.seq + 7) == []
    assert any(isinstance(e, Unresponsive) for e in fd.tick(TIMEOUT + 0.01))


def test_dialing_time_is_not_silence() -> None:
    fd, nodes = detector(3)
    target = nodes[1]
    fd.suspect(target)
    (probe,) = [e for e in fd.tick(0.0) if isinstance(e, Probe) and e.target == target]
    fd.set_deadline(target, probe.seq, 2.0)  # still connecting
    assert not [e for e in fd.tick(1.0) if isinstance(e, ProbeVia) and e.target == target]
    fd.set_deadline(target, probe.seq, 1.0 + TIMEOUT)  # connected: the ack clock starts
    assert [e for e in fd.tick(1.0 + TIMEOUT) if isinstance(e, ProbeVia) and e.target == target]


def test_a_starved_local_loop_is_not_taken_for_dead_peers() -> None:
    fd, _ = detector(2)
    (probe, *_) = [e for e in fd.tick(0.0) if isinstance(e, Probe)]
    # our loop stalls for 3 s: the ack may be waiting unread, so no verdict yet
    late = fd.tick(3.0)
    assert not any(isinstance(e, ProbeVia | Unresponsive) and e.target == probe.target
                   for e in late)
    assert fd.on_ack(probe.target, probe.seq) == []
    assert not fd.is_unresponsive(probe.target)


def test_unresponsive_members_are_reprobed_on_their_backoff() -> None:
    fd, nodes = detector(5)
    dead = nodes[0]
    seen = run(fd, {dead}, 30.0)
    marked = next(t for t, e in seen if e == Unresponsive(dead))
    retries = [t for t, e in seen if isinstance(e, Probe) and e.target == dead and t > marked]
    gaps = [b - a for a, b in zip([marked, *retries], retries, strict=False)]
    assert retries and max(gaps) <= 8.0 + TIMEOUT + INDIRECT + 0.2  # backoff_max bounds it
    assert fd.heard_from(dead) == [Alive(dead)]
