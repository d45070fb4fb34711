"""Membership at small scale: the real SWIM and gossip cores of 50 nodes in virtual time."""

from __future__ import annotations

import dataclasses
from typing import Any

from blobmesh.sim.membership import (
    HELLO,
    RECORD,
    STATE,
    MembershipResult,
    MembershipScenario,
    run,
    summary_bytes,
)
from blobmesh.space import Limits, Timing


def scenario(**kw: Any) -> MembershipScenario:
    return MembershipScenario(**{"nodes": 50, "duration": 20.0, "joins": 3, **kw})


def measured(r: MembershipResult) -> dict[str, Any]:
    out = r.to_json()
    del out["wall_s"], out["mem_per_node_kib"]  # of this machine, not of the run
    return out


def test_message_sizes_come_from_the_real_encoding() -> None:
    assert 150 < RECORD < 400 and 64 < HELLO < 128 and 64 < STATE < 128
    lim = Limits()
    # listing 10,000 records takes ten pages of ~44 bytes each
    assert 40 * 10_000 < summary_bytes([1], 10_000, lim) < 50 * 10_000


def test_a_join_spreads_to_every_node() -> None:
    r = run(scenario())
    assert len(r.joins) == 3
    assert all(j.known_by == 1.0 and j.t99_s is not None and j.t99_s < 2.0 for j in r.joins)
    assert r.false_marks == 0 and r.crashed == 0


def test_a_crashed_node_is_declared_dead() -> None:
    r = run(scenario(crash_fraction=0.04, duration=25.0))
    t = Timing()
    assert r.crashed == 2 and r.crash_detect_s_max is not None
    # a probe reaches it within a few periods, then ping-req and the suspicion period
    assert r.crash_detect_s_max < 4 * t.probe_interval + t.probe_timeout + \
        t.indirect_timeout + t.suspicion_timeout
    assert r.crash_marked_by_p50 >= 2
    assert r.false_marks == 0


def test_a_cpu_starved_node_is_not_declared_dead() -> None:
    starved = scenario(starved_fraction=0.04, joins=0, duration=25.0)
    r = run(starved)
    assert r.starved == 2
    assert r.false_deaths_starved == 0 and r.false_deaths_healthy == 0 and r.false_marks == 0
    # what the suspicion period saves them from: without it, late acks are taken for silence
    hasty = run(dataclasses.replace(starved, timing=Timing(suspicion_timeout=0.0)))
    assert hasty.false_deaths_starved == 2


def test_a_seed_reproduces_a_run() -> None:
    sc = scenario(starved_fraction=0.04, crash_fraction=0.04)
    a, b = run(sc), run(sc)
    assert measured(a) == measured(b)
    assert measured(run(dataclasses.replace(sc, seed=1))) != measured(a)


def test_gossip_bytes_follow_the_changes_not_the_nodes() -> None:
    # 400 nodes re-signing and joining: listing every record per differing round (protocol
    # version 2, 1-hour records) cost 6.8 KB/s per node here; walking the tree ~0.5 KB/s
    r = run(scenario(nodes=400, joins=5))
    gossip = sum(v for k, v in r.bytes_per_s_by_kind.items() if k.startswith("gossip"))
    assert {"gossip-digest", "gossip-tree", "gossip-diff"} <= set(r.bytes_per_s_by_kind)
    assert gossip < 1000 and r.bytes_out_per_s_node_p50 < 1000
    assert all(j.known_by == 1.0 for j in r.joins)
