"""Simulated nodes driving the real schedulers: crash and restart, bans."""

from __future__ import annotations

from blobmesh.distribution.scheduler import DownloadPolicy
from blobmesh.sim.engine import Simulator
from blobmesh.sim.swarm import NodeSpec, Swarmwide, World

MB = 1e6


def world(specs: list[NodeSpec], pieces: int = 40, piece: int = 250_000) -> World:
    sim = Simulator(seed=2)
    wide = Swarmwide(pieces, piece, pieces * piece, DownloadPolicy(flush_interval=0.5))
    everyone = list(range(len(specs)))
    return World(sim, wide, specs, lambda _node: lambda: everyone)


def test_a_crashed_target_restarts_from_its_flushed_pieces_and_completes() -> None:
    w = world([NodeSpec(10 * MB, 10 * MB, 1e-4), NodeSpec(10 * MB, 10 * MB, 1e-4,
                                                          restart_after=1.0)])
    source, target = w.nodes
    for node in w.nodes:
        w.sim.at(0.0, node.join)
    seen: dict[str, int] = {}

    def crash() -> None:
        seen["had"] = target.have.count()
        target.crash()
        seen["kept"] = target.have.count()

    w.sim.at(0.7, crash)  # at 10 MB/s, about 28 of the 40 pieces by then
    w.sim.at(1.5, lambda: seen.update(restarted=target.have.count()))
    w.sim.run(until=30.0)
    assert 0 < seen["kept"] < seen["had"]  # what was not flushed yet is lost
    assert seen["restarted"] >= seen["kept"] and target.outcome.crashes == 1
    assert target.complete and target.outcome.done_at is not None
    assert target.outcome.done_at > 1.7  # down for a second, then the rest
    assert not source.ends and not target.ends  # both complete: connections closed


def test_a_lying_peer_is_banned_and_the_download_goes_on_from_the_source() -> None:
    fast = 10 * MB
    w = world([NodeSpec(fast, fast, 1e-4), NodeSpec(fast, fast, 1e-4),
               NodeSpec(fast, fast, 1e-4, liar=True)])
    w.nodes[2].have = w.nodes[0].have.copy()  # the liar claims the whole blob
    w.nodes[2].complete = w.nodes[2].has_layer = True
    for node in w.nodes:
        w.sim.at(0.0, node.join)
    w.sim.run(until=30.0)
    honest = w.nodes[1]
    assert honest.complete and honest.outcome.bans == 1 and 2 in honest.banned
