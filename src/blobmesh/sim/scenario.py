"""One simulated distribution: a source, N targets, their links and faults, and its result.

:func:`run` builds the fleet from a :class:`Scenario` (every random draw from its seed), runs
it until every honest target holds the blob (or ``max_time``), and returns a :class:`Result`
with the Kumar–Ross bound of the same links.
"""

from __future__ import annotations

import gc
import math
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from blobmesh.distribution.config import SwarmConfig
from blobmesh.distribution.scheduler import DownloadPolicy
from blobmesh.sim.bounds import kumar_ross
from blobmesh.sim.engine import Simulator
from blobmesh.sim.swarm import KINDS, SOURCE, NodeSpec, SimNode, Swarmwide, World

MBIT = 1e6 / 8  # bytes/s
MiB = 1 << 20
GiB = 1 << 30
Links = Literal["homogeneous", "heterogeneous"]
NODE = SwarmConfig()  # what a real node runs: the simulator's defaults


@dataclass(slots=True)
class Scenario:
    """Everything a run depends on (rates in Mbit/s, times in seconds)."""

    nodes: int = 100  # targets, besides the source
    size: int = 32 * MiB
    piece_size: int = 1 * MiB
    seed: int = 0
    links: Links = "homogeneous"
    rate_mbit: float = 100.0  # every link (homogeneous); the fast ones (heterogeneous)
    slow_rate_mbit: float = 20.0  # heterogeneous: half the targets have these links
    latency_ms: float = 0.5  # one way from a node to the switch (jittered ±50 %)
    join_spread: float = 0.2  # targets learn of the distribution within this time
    crash_fraction: float = 0.0  # of the targets, crashing once during the transfer
    restart_after: float = 5.0
    starved_fraction: float = 0.0  # of the targets, whose timers fire late
    timer_lag: float = 2.0
    liar_fraction: float = 0.0  # of the targets, serving corrupt pieces
    max_connections: int = NODE.max_connections
    upload_slots: int | None = NODE.upload_slots  # None: every connection sends at once
    max_upload_slots: int | None = NODE.max_upload_slots  # adaptive, up to this many (None: fixed)
    policy: DownloadPolicy = field(default_factory=NODE.download_policy)
    max_time: float = 3600.0
    # all nodes on one machine of ``cores``, each GiB delivered costing ``cpu_s_per_gib``
    # CPU-seconds (sender and receiver together): a resource every piece flow crosses
    cpu_s_per_gib: float = 0.0  # 0: the CPU is no limit
    cores: float = 2.0


@dataclass(slots=True)
class Result:
    """What one run measured (JSON-ready through :meth:`to_json`)."""

    scenario: Scenario
    nodes: int
    t_all_s: float  # when the last honest target completed (inf if some never did)
    bound_s: float
    ratio: float
    p50_ratio: float
    p99_ratio: float
    completed: int
    source_copies: float  # bytes the source uploaded, in copies of the blob
    # bytes the targets uploaded / what their uplinks could have carried until t_all
    target_upload_utilisation: float
    # control messages into the source per second, over t_all or until the last final note
    # held back (``NoteSchedule.final_delay``) arrived, if later
    source_ctrl_msgs_per_s: float
    source_ctrl_msgs_per_s_peak: float  # ... in its busiest second
    source_notes_per_s: float  # of which progress notifications
    # ... by kind (``sim.swarm.KINDS``: hellos, haves, requests…, notes by cause), per second
    source_ctrl_msgs_by_kind: dict[str, float]
    source_dials: int  # connection attempts the source received
    ctrl_bytes_per_s_node_p50: float  # control bytes in + out per node and second
    ctrl_bytes_per_s_node_max: float
    dist_ops: int  # dist/* ops published, gossiped to all: the request and one summary
    bans: int
    crashes: int
    failures: int
    events: int
    wall_s: float
    mem_per_node_kib: float
    finish_times: list[float] = field(repr=False)
    series_t: list[float] = field(repr=False)
    series_source_up: list[float] = field(repr=False)  # bytes/s
    series_target_up: list[float] = field(repr=False)  # targets' upload / their capacity
    ctrl_msgs_per_node: list[int] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """The summary (no time series): one flat object plus the scenario."""
        out = {k: v for k, v in asdict(self).items()
               if k not in ("scenario", "finish_times", "series_t", "series_source_up",
                            "series_target_up", "ctrl_msgs_per_node")}
        sc = asdict(self.scenario)
        out["scenario"] = sc
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def _specs(sc: Scenario, sim: Simulator) -> list[NodeSpec]:
    rng = sim.rng
    fast = sc.rate_mbit * MBIT
    slow = sc.slow_rate_mbit * MBIT

    def latency() -> float:
        return sc.latency_ms / 1000 * rng.uniform(0.5, 1.5)

    specs = [NodeSpec(fast, fast, latency())]  # the source
    targets = list(range(sc.nodes))
    rng.shuffle(targets)
    n_crash = round(sc.crash_fraction * sc.nodes)
    n_starved = round(sc.starved_fraction * sc.nodes)
    n_liar = round(sc.liar_fraction * sc.nodes)
    crashers = set(targets[:n_crash])
    starved = set(targets[n_crash:n_crash + n_starved])
    liars = set(targets[n_crash + n_starved:n_crash + n_starved + n_liar])
    bound_guess = sc.size / fast
    for i in range(sc.nodes):
        rate = slow if sc.links == "heterogeneous" and i % 2 else fast
        join = rng.uniform(0, sc.join_spread)
        specs.append(NodeSpec(
            rate, rate, latency(), join_at=join,
            liar=i in liars, timer_lag=sc.timer_lag if i in starved else 0.0,
            crash_at=join + rng.uniform(0.2, 0.8) * bound_guess if i in crashers else None,
            restart_after=sc.restart_after))
    return specs


def same_order_for_all(n: int, sim: Simulator) -> Callable[[SimNode], Callable[[], Sequence[int]]]:
    """The service's peer source: the source first, then every target in node-id order — one
    list that every target gets (``DistributionService`` resolves the scope sorted by id)."""
    order = list(range(1, n + 1))
    sim.rng.shuffle(order)  # node ids are random, so id order is a random permutation
    shared = (SOURCE, *order)

    def for_node(_node: SimNode) -> Callable[[], Sequence[int]]:
        return lambda: shared

    return for_node


def _rss_kib() -> float:
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def run(sc: Scenario, progress: Callable[[float, int, int], None] | None = None,
        sample_every: float = 0.1) -> Result:
    """Run one scenario; ``progress(now, completed, targets)`` about every virtual second."""
    if sc.nodes < 1:
        raise ValueError("need at least one target")
    wall0 = time.perf_counter()
    rss0 = _rss_kib()
    sim = Simulator(sc.seed)
    pieces = max(1, -(-sc.size // sc.piece_size))
    wide = Swarmwide(pieces, sc.piece_size, sc.size, sc.policy, sc.max_connections,
                     sc.upload_slots, sc.max_upload_slots)
    specs = _specs(sc, sim)
    world = World(sim, wide, specs, same_order_for_all(sc.nodes, sim))
    if sc.cpu_s_per_gib > 0:
        world.net.share(sc.cores * GiB / sc.cpu_s_per_gib)
    world.on_all_done = sim.stop
    for node in world.nodes:
        sim.at(node.spec.join_at, node.join)
        if node.spec.crash_at is not None:
            sim.at(node.spec.crash_at, node.crash)

    series_t: list[float] = []
    series_up: list[float] = []
    series_source_in: list[int] = []  # the source's inbound messages so far
    series_targets: list[float] = []
    source = world.nodes[SOURCE]
    net = world.net
    target_ids = [n.net_id for n in world.nodes[1:]]
    target_cap = sum(net.up(i) for i in target_ids)
    last = [0.0, 0.0]  # time, source bytes sent

    def sample() -> None:
        now = sim.now
        sent = world.net.bytes_sent[source.net_id] + sum(
            f.size - f.remaining + f.rate * (now - f.since)
            for f in world.net.flows_of(source.net_id) if f.src == source.net_id)
        if now > last[0]:
            series_t.append(now)
            series_up.append((sent - last[1]) / (now - last[0]))
            series_targets.append(sum(net.upload_rate(i) for i in target_ids) / target_cap)
            series_source_in.append(source.traffic.msgs_in)
        last[0], last[1] = now, sent
        if world.completed < world.honest_targets:
            sim.after(sample_every, sample)

    sim.after(sample_every, sample)
    gc_was_on = gc.isenabled()
    gc.disable()  # millions of short-lived objects: full collections would grow with the fleet
    try:
        sim.run(until=sc.max_time,
                on_tick=(lambda now: progress(now, world.completed, world.honest_targets))
                if progress else None)
    finally:
        if gc_was_on:
            gc.enable()
    rss1 = _rss_kib()
    return _result(sc, world, sim, time.perf_counter() - wall0,
                   max(0.0, rss1 - rss0) / (sc.nodes + 1), series_t, series_up, series_targets,
                   series_source_in, sample_every)


def _source_inbound(world: World, horizon: float, series_t: list[float],
                    series_in: list[int], step: float) -> tuple[float, float, dict[str, int]]:
    """The source's inbound messages: the window they arrived in (``horizon``, or later if a
    note held back arrives later), the most in one second, and how many of each kind (the
    notes held back included)."""
    traffic = world.nodes[SOURCE].traffic
    kinds = dict(traffic.kinds_in)
    end = horizon
    for at, kind in world.late_notes:
        kinds[kind] = kinds.get(kind, 0) + 1
        end = max(end, at)
    # messages per bin of ``step`` seconds: the samples until the end, then the late notes
    n_bins = int(end / step) + 1
    bins = [0] * n_bins
    prev = 0
    for t, cum in zip([*series_t, horizon], [*series_in, traffic.msgs_in], strict=True):
        b = min(n_bins - 1, max(0, math.ceil(t / step - 1e-6) - 1))  # the bin ending at t
        bins[b] += cum - prev
        prev = cum
    for at, _kind in world.late_notes:
        bins[min(n_bins - 1, int(at / step))] += 1
    width = max(1, round(1.0 / step))
    window = sum(bins[:width])
    peak = window
    for i in range(width, n_bins):
        window += bins[i] - bins[i - width]
        peak = max(peak, window)
    return end, float(peak), kinds


def _result(sc: Scenario, world: World, sim: Simulator, wall: float, mem_kib: float,
            series_t: list[float], series_up: list[float], series_targets: list[float],
            series_source_in: list[int], sample_every: float) -> Result:
    source = world.nodes[SOURCE]
    honest = [n for n in world.nodes[1:] if not n.spec.liar]
    finish = sorted(n.outcome.done_at if n.outcome.done_at is not None else float("inf")
                    for n in honest)
    t_all = finish[-1]
    targets = world.nodes[1:]
    bound = kumar_ross(sc.size, source.spec.up, [n.spec.down for n in targets],
                       [n.spec.up for n in targets])
    horizon = t_all if t_all != float("inf") else sim.now
    per_node = [(n.traffic.bytes_in + n.traffic.bytes_out) / max(horizon, 1e-9)
                for n in world.nodes]
    q = statistics.quantiles(finish, n=100, method="inclusive") if len(finish) > 1 \
        else [finish[0]] * 99
    src_window, src_peak, src_kinds = _source_inbound(world, horizon, series_t,
                                                      series_source_in, sample_every)
    src_window = max(src_window, 1e-9)
    return Result(
        scenario=sc, nodes=sc.nodes, t_all_s=t_all, bound_s=bound, ratio=t_all / bound,
        p50_ratio=statistics.median(finish) / bound, p99_ratio=q[98] / bound,
        completed=sum(1 for t in finish if t != float("inf")),
        source_copies=world.net.bytes_sent[source.net_id] / sc.size,
        target_upload_utilisation=sum(world.net.bytes_sent[n.net_id] for n in targets) /
        max(1e-9, horizon * sum(n.spec.up for n in targets)),
        source_ctrl_msgs_per_s=sum(src_kinds.values()) / src_window,
        source_ctrl_msgs_per_s_peak=src_peak,
        source_notes_per_s=(source.traffic.notes_in + len(world.late_notes)) / src_window,
        source_ctrl_msgs_by_kind={k: round(src_kinds[k] / src_window, 1)
                                  for k in KINDS if k in src_kinds},
        source_dials=source.traffic.dials_in,
        ctrl_bytes_per_s_node_p50=statistics.median(per_node),
        ctrl_bytes_per_s_node_max=max(per_node),
        dist_ops=world.dist_ops,
        bans=sum(n.outcome.bans for n in world.nodes),
        crashes=sum(n.outcome.crashes for n in world.nodes),
        failures=sum(n.outcome.failures for n in world.nodes),
        events=sim.events_run, wall_s=wall, mem_per_node_kib=mem_kib,
        finish_times=finish, series_t=series_t, series_source_up=series_up,
        series_target_up=series_targets,
        ctrl_msgs_per_node=[n.traffic.msgs_in + n.traffic.msgs_out for n in world.nodes])


__all__ = ["Result", "Scenario", "run", "same_order_for_all"]
