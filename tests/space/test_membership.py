"""The membership core under a fake clock: probing on its timer, seeds, the periodic rounds."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from blobmesh.space import Metrics, Seed, Timing
from blobmesh.space.membership import BootstrapRound, Maintain, Membership
from blobmesh.space.swim import Probe, ProbeVia, Unresponsive
from blobmesh.transport.identity import Identity, NodeId

T = Timing(probe_interval=1.0, probe_timeout=0.3, indirect_timeout=0.6,
           maintenance_interval=2.0, bootstrap_interval=30.0, unresponsive_backoff_max=8.0)


def core(n: int, *, bootstrap: bool = False) -> tuple[Membership, list[NodeId], Metrics]:
    m = Metrics()
    mem = Membership(T, max_seeds=2, bootstrap=bootstrap, rng=random.Random(3), metrics=m)
    nodes = [Identity.generate().node_id for _ in range(n)]
    for node in nodes:
        mem.joined(node)
    mem.start(0.0)
    return mem, nodes, m


def run(mem: Membership, dead: set[NodeId], until: float) -> list[tuple[float, object]]:
    """Fire only when get_timer() says (as the driver does); live members ack at once."""
    seen: list[tuple[float, object]] = []
    now = 0.0
    while (now := max(now, mem.get_timer())) <= until:
        for a in mem.handle_timer(now):
            seen.append((now, a))
            if isinstance(a, Probe | ProbeVia) and a.target not in dead:
                seen.extend((now, e) for e in mem.acked(a.target, a.seq))
    return seen


@pytest.mark.parametrize("module", ["membership", "dissemination", "links", "swim", "fetch",
                                    "admission"])
def test_cores_import_no_io(module: str) -> None:
    code = (f"import sys, blobmesh.space.{module}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('asyncio', 'socket', 'ssl', 'threading', 'sqlite3')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_a_dead_member_is_marked_within_the_bound_on_timers_alone() -> None:
    mem, nodes, _ = core(6)
    dead = nodes[2]
    seen = run(mem, {dead}, 20.0)
    marks = [(t, a) for t, a in seen if isinstance(a, Unresponsive)]
    assert [a.target for _, a in marks] == [dead]
    assert marks[0][0] <= 2 * len(nodes) * T.probe_interval + T.probe_timeout + \
        T.indirect_timeout + T.suspicion_timeout
    assert mem.is_unresponsive(dead)
    # few wake-ups: about two per probe interval, not a poll
    assert len({t for t, _ in seen}) < 20.0 / T.probe_interval * 4


def test_timer_never_waits_longer_than_half_a_probe_interval() -> None:
    mem, _, _ = core(0)
    mem.handle_timer(0.0)
    assert 0.0 < mem.get_timer() <= T.probe_interval / 2


def test_a_broken_link_is_probed_at_the_next_timer() -> None:
    mem, nodes, _ = core(3)
    probed = {a.target for a in mem.handle_timer(0.0) if isinstance(a, Probe)}
    broken = next(n for n in nodes if n not in probed)
    mem.link_lost(broken)
    assert mem.get_timer() == 0.0  # now: do not wait for the round-robin
    assert any(isinstance(a, Probe) and a.target == broken for a in mem.handle_timer(0.01))


def test_a_late_timer_is_starvation_not_silence() -> None:
    mem, nodes, _ = core(1)
    (probe,) = [a for a in mem.handle_timer(0.0) if isinstance(a, Probe)]
    late = mem.handle_timer(5.0)  # asked for at most 0.5 s, woken at 5 s
    assert not any(isinstance(a, ProbeVia | Unresponsive) for a in late)
    assert mem.acked(probe.target, probe.seq) == []
    assert not mem.is_unresponsive(nodes[0])


def test_rounds_come_on_their_intervals() -> None:
    mem, _, _ = core(0, bootstrap=True)
    seen = run(mem, set(), 60.0)
    maint = [t for t, a in seen if isinstance(a, Maintain)]
    boot = [t for t, a in seen if isinstance(a, BootstrapRound)]
    assert maint[:3] == [2.0, 4.0, 6.0] and len(maint) == 30
    assert boot == [30.0, 60.0]
    no_servers, _, _ = core(0)
    assert not any(isinstance(a, BootstrapRound) for _, a in run(no_servers, set(), 60.0))


def test_seeds_are_bounded_and_leave_when_their_record_arrives() -> None:
    mem, _, m = core(0)
    a, b, c = (Identity.generate().node_id for _ in range(3))
    assert mem.add_seed(Seed(a)) and mem.add_seed(Seed(b))
    assert not mem.add_seed(Seed(c)) and m["limit_seeds"] == 1
    mem.joined(a)
    assert list(mem.seeds) == [b]
    assert mem.add_seed(Seed(c))
