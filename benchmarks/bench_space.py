"""The space with 50 nodes over TLS on loopback: convergence, op latency, gossip cost, memory.

    .venv/bin/python benchmarks/bench_space.py [--nodes 50] [--per-process 10] [--ops 10000]

Nodes run in ``python -m blobmesh.space.runner`` processes (``--per-process`` nodes each, each
node with its own TLS endpoint, identity and SQLite file; ``--per-process 1`` gives one process
per node).  Default timing (gossip every 1 s with one peer, a SWIM probe every 0.5 s).

1. cold start: one seed node, then every other process at once with the seed's ticket; time
   until every node knows all others, from the moment the last node started (and from launch);
2. op latency: ops published one by one on random nodes; time until the last node stored each
   (p50, p99);
3. steady-state gossip: space-protocol bytes sent per node per second over a quiet window,
   with the op store nearly empty and again holding ``--ops`` ops (same pre-signed ops loaded
   into every node, then left to settle);
4. memory: resident set size per process, divided by its nodes.

Goals: convergence < 5 s, op p99 < 1 s, gossip < 2 KB/s per node and flat in ops held.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the tests' process driver

from tests.space.procs import RunnerProc, wait_for

from blobmesh.space import Limits
from blobmesh.space.records import sign_op, sign_record
from blobmesh.transport import Identity

# per message, not counted by the space: transport frame header (~10 B) + TLS record (22 B)
WIRE_OVERHEAD = 32


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def statuses(procs: list[RunnerProc]) -> list[dict[str, Any]]:
    return [s for p in procs for s in p.status()]


def traffic(procs: list[RunnerProc], window: float) -> list[float]:
    """Per node per second over ``window``: space bytes sent, messages sent, gossip bytes,
    gossip rounds."""
    keys = ("bytes_sent", "messages_sent", "gossip_bytes", "gossip_rounds")

    def totals() -> list[int]:
        st = statuses(procs)
        return [sum(s["metrics"].get(k, 0) for s in st) for k in keys]

    before = totals()
    t0 = time.monotonic()
    time.sleep(window)
    after = totals()
    dt = time.monotonic() - t0
    n = sum(p.nodes for p in procs)
    return [(a - b) / dt / n for a, b in zip(after, before, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--per-process", type=int, default=10)
    ap.add_argument("--ops", type=int, default=10_000)
    ap.add_argument("--latency-ops", type=int, default=40)
    ap.add_argument("--window", type=float, default=10.0)
    args = ap.parse_args()
    n = args.nodes
    tmp = Path(tempfile.mkdtemp(prefix="bench-space-"))
    common = ["--events", "--expect", str(n)]
    procs: list[RunnerProc] = []
    try:
        # --- 1. cold start -----------------------------------------------------------------
        seed = RunnerProc(tmp / "seed", 1, extra=common)
        procs.append(seed)
        sizes = []
        left = n - 1
        while left > 0:
            sizes.append(min(args.per_process, left))
            left -= sizes[-1]
        launched = time.time()
        rest = [RunnerProc(tmp / f"p{i}", k, bootstrap=[seed.tickets[0]], extra=common,
                           wait=False) for i, k in enumerate(sizes)]
        procs += rest
        for p in rest:
            p.wait_ready()
        started = max(p.tickets_at for p in rest)
        def last(event: str) -> float | None:
            ts = [e["t"] for p in procs for e in p.events if e["event"] == event]
            return max(ts) if len(ts) == n else None

        wait_for(lambda: last("alive") is not None, within=120, step=0.1)
        full, alive = last("full"), last("alive")
        assert full is not None and alive is not None
        print(f"nodes: {n} in {len(procs)} processes ({args.per_process} per process)")
        print(f"cold start to full peer tables: {full - started:.2f} s after the last node "
              f"started ({full - launched:.2f} s after launching the processes); "
              f"all peers also probed alive: {alive - started:.2f} s")

        # --- 2. op latency ---------------------------------------------------------------
        rng = random.Random(7)
        latencies = []
        for _ in range(args.latency_ops):
            p = rng.choice(procs)
            reply = p.call(cmd="publish", node=rng.randrange(p.nodes), kind="test",
                           payload="x" * 200)
            op_id, t0 = reply["published"], reply["t"]

            def arrivals(op_id: str = op_id) -> list[float]:
                return [e["t"] for q in procs for e in q.events
                        if e["event"] == "op" and e["id"] == op_id]

            wait_for(lambda: len(arrivals()) == n, within=30, step=0.02)
            latencies.append(max(arrivals()) - t0)
            time.sleep(0.1)
        print(f"op to all nodes: p50 {pct(latencies, 50) * 1000:.0f} ms, "
              f"p99 {pct(latencies, 99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
              f"({len(latencies)} ops)")

        # --- 3. steady-state gossip ------------------------------------------------------
        time.sleep(3)
        few = traffic(procs, args.window)
        held = statuses(procs)[0]["ops"]
        author = Identity.generate()
        lim = Limits()
        now = int(time.time() * 1000)
        ops = [sign_op(author, space="default", kind="bench", timestamp=now - i,
                       payload=b"%08d" % i + b"." * 120, limits=lim).raw
               for i in range(args.ops)]
        record = sign_record(author, space="default", addresses=[], groups=[], capabilities={},
                             created_at=now, expires_at=now + 3_600_000)
        path = tmp / "ops.msgpack"
        path.write_bytes(msgspec.msgpack.encode(([record], ops)))
        for p in procs:
            p.call(cmd="load", path=str(path), within=300)
        total = held + args.ops
        wait_for(lambda: all(s["ops"] == total for s in statuses(procs)), within=120, step=1)
        time.sleep(5)  # let in-flight reconciliation finish
        many = traffic(procs, args.window)
        for (b, m, gb, gr), count in ((few, held), (many, total)):
            print(f"steady state with {count:>6} ops held, per node: all space traffic "
                  f"{b:4.0f} B/s payload ({m:3.1f} msg/s, ~{b + m * WIRE_OVERHEAD:4.0f} B/s on "
                  f"the wire); gossip alone {gb:4.0f} B/s, {gb / gr if gr else 0:4.0f} B/round")

        # --- 4. memory -------------------------------------------------------------------
        per_node = []
        for p in procs:
            rss = p.call(cmd="status")["rss_kb"]
            per_node.append(rss / p.nodes)
        single = [p.call(cmd="status")["rss_kb"] for p in procs if p.nodes == 1]
        print(f"memory: {statistics.median(per_node) / 1024:.1f} MiB RSS per node "
              f"(process RSS / nodes in it, median)"
              + (f"; a one-node process: {single[0] / 1024:.1f} MiB" if single else ""))
        unresponsive = sum(len(s["unresponsive"]) for s in statuses(procs))
        print(f"unresponsive marks at the end (false positives): {unresponsive}")
    finally:
        for p in procs:
            p.stop()


if __name__ == "__main__":
    main()
