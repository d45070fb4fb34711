"""Real runner processes over TLS on loopback: 20 nodes from one bootstrap ticket.

The tests share one cluster and run in file order (converge, op, leave, kill).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.space.procs import RunnerProc, wait_for

pytestmark = pytest.mark.slow
FAST = ["--fast"]


class Fleet:
    def __init__(self, tmp: Path) -> None:
        self.seed = RunnerProc(tmp / "seed", 1, extra=FAST)
        ticket = self.seed.tickets[0]
        self.victim = RunnerProc(tmp / "victim", 1, bootstrap=[ticket], extra=FAST)
        self.groups = [RunnerProc(tmp / f"g{i}", 6, bootstrap=[ticket], extra=FAST)
                       for i in range(3)]
        self.procs = [self.seed, self.victim, *self.groups]

    def statuses(self, skip: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for p in self.procs:
            if p.proc.poll() is None:
                out.extend(s for s in p.status() if s["node"] not in skip)
        return out

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        yield f
    finally:
        f.stop()


def test_twenty_nodes_converge_from_one_ticket(fleet: Fleet) -> None:
    took = wait_for(lambda: all(s["alive"] == 19 for s in fleet.statuses()), within=20)
    assert len(fleet.statuses()) == 20
    print(f"converged in {took:.1f}s")


def test_op_published_on_one_reaches_all(fleet: Fleet) -> None:
    fleet.groups[1].call(cmd="publish", node=3, kind="test", payload="hello fleet")
    wait_for(lambda: all(s["ops"] == 1 for s in fleet.statuses()), within=5)


def test_leaving_node_tombstone_reaches_all(fleet: Fleet) -> None:
    leaver = fleet.groups[2].call(cmd="leave", node=5)["left"]
    rest = frozenset({leaver})
    wait_for(lambda: all(leaver in s["left"] and s["alive"] == 18
                         for s in fleet.statuses(skip=rest)), within=5)


def test_killed_node_is_marked_unresponsive(fleet: Fleet) -> None:
    victim = fleet.victim.status()[0]["node"]
    fleet.victim.kill()
    took = wait_for(lambda: all(victim in s["unresponsive"] for s in fleet.statuses()),
                    within=10)
    print(f"marked unresponsive everywhere in {took:.1f}s")
