"""A real node's memory with 10,000 known peers.

    .venv/bin/python benchmarks/bench_space_scale.py [--peers 10000] [--settle 30] [--json]

1. makes ``--peers`` identities (real Ed25519 keys), less one per feeder (the feeders are
   peers too), and signs one peer record for each in the
   real record format (:func:`blobmesh.space.records.sign_record`; two addresses on closed
   loopback ports, a group, two capabilities, valid for an hour);
2. starts a real ``blobmesh node run`` process (an open space, its own home and SQLite file);
3. feeders — each a :class:`~blobmesh.space.space.Space` in this process over its own TLS
   endpoint, holding ``--per-feeder`` of the records — join one after the other through the
   node's ticket: a feeder's first anti-entropy round walks the node's prefix tree and lists
   the prefixes that differ, the node wants every record there, and the feeder pushes them
   (the real gossip ingest path: handshake, ``g-hello``/``g-state``, ``g-tree``,
   ``PeerSummary``, ``PeerDiff``, ``PushRecords``, verification of every signature, the peer
   store).  One feeder holding all 10,000 does not work here: the node did not store a push
   of 1,024 records within the 3 s request timeout on this loaded machine, the round ended,
   and the feeder's later rounds went to the fake peers it knows;
4. samples the node's resident set (``VmRSS``, and the peak ``VmHWM``) from ``/proc`` before
   the feed, until the node holds the records, and for ``--settle`` seconds after, while it
   probes and gossips with peers that never answer.

The peer store holds at most ``Limits.max_peers`` records of other nodes (and its own): records
beyond that are refused (``limit_peer_store``) and the report says how many.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from blobmesh.errors import BlobmeshError
from blobmesh.node.client import NodeClient
from blobmesh.space import Limits
from blobmesh.space.config import Seed, SpaceConfig
from blobmesh.space.records import sign_record
from blobmesh.space.space import Space, endpoint_address_book
from blobmesh.transport import Endpoint, Identity, Ticket, format_address

SPACE = "scale"
ATTEMPTS = 5


def ask(home: Path, what: str) -> Any:
    """``node``, ``peers`` or ``metrics`` of the running node, over its control socket."""
    async def go() -> Any:
        async with NodeClient(home) as node:
            return await getattr(node, what)()

    return asyncio.run(go())


def proc_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def make_records(n: int) -> list[bytes]:
    now = int(time.time() * 1000)
    raws = []
    for i in range(n):
        ident = Identity.generate()
        port = 1 + i % 1000  # loopback ports nothing listens on: dials fail at once
        raws.append(sign_record(ident, space=SPACE,
                                addresses=[f"127.0.0.1:{port}", f"[::1]:{port}"],
                                groups=["workers"],
                                capabilities={"arch": "x86_64", "mem_gb": 64},
                                created_at=now, expires_at=now + 3600 * 1000))
    return raws


def wait_for_node(home: Path, proc: subprocess.Popen[bytes], within: float = 60.0
                  ) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        if proc.poll() is not None:
            raise RuntimeError("blobmesh node run exited")
        try:
            info: dict[str, Any] = ask(home, "node")
            return info
        except (BlobmeshError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


async def feed(ticket: str, raws: list[bytes], tmp: Path, node_home: Path, per_feeder: int
               ) -> dict[str, Any]:
    """Feeders join the node's space one after the other, ``per_feeder`` records (and its own)
    in each one's store: the join's sync round with the node hands them over in one push.  A feeder
    whose records did not all arrive (the round timed out on this loaded machine) syncs with
    the node again, up to ``ATTEMPTS`` times."""
    seed = Seed.from_ticket(Ticket.parse(ticket))
    syncs = 0
    async with NodeClient(node_home) as node:
        held = len(await node.peers())
        for k in range(0, len(raws), per_feeder):
            ident = Identity.generate()
            ep = await Endpoint.start(ident, ("127.0.0.1", 0))
            cfg = SpaceConfig(name=SPACE, seeds=(seed,),
                              addresses=tuple(format_address(a) for a in ep.ticket.addrs))
            space = Space(cfg, ident, ep, tmp / f"feeder{k}.sqlite",
                          address_book=endpoint_address_book(ep.add_peer_addresses))
            chunk = raws[k:k + per_feeder]
            space.add_records(chunk)
            await space.start()
            want = held + len(chunk) + 1  # and the feeder's own record
            for _ in range(ATTEMPTS):
                space.add_seed(seed)  # again a seed: join() syncs with it
                await space.join()
                syncs += 1
                held = len(await node.peers())
                if held >= min(want, Limits().max_peers):
                    break
            await space.aclose()
            await ep.aclose()
    return {"feeders": math.ceil(len(raws) / per_feeder), "feeder_syncs": syncs}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--peers", type=int, default=10_000)
    p.add_argument("--per-feeder", type=int, default=250, metavar="N",
                   help="records each feeder hands over")
    p.add_argument("--settle", type=float, default=30.0,
                   help="seconds to keep sampling once the node holds the records")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    t0 = time.monotonic()
    per_record = args.per_feeder - 1  # and the feeder's own
    raws = make_records(args.peers - math.ceil(args.peers / args.per_feeder))
    signed_s = time.monotonic() - t0
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "node"
        cli = str(Path(sys.executable).with_name("blobmesh"))
        proc = subprocess.Popen([cli, "--home", str(home), "node",
                                 "run", "--open", "--space", SPACE, "--listen", "127.0.0.1:0",
                                 "--log-level", "warning"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            info = wait_for_node(home, proc)
            time.sleep(2.0)
            before = proc_kib(proc.pid)
            fed = asyncio.run(feed(info["ticket"], raws, Path(tmp), home, per_record))
            t1 = time.monotonic()
            known, last = 0, -1
            while time.monotonic() - t1 < 120 and known != last:  # until it stops growing
                time.sleep(3.0)
                last, known = known, len(ask(home, "peers"))
            ingest_s = time.monotonic() - t1
            samples = []
            t2 = time.monotonic()
            while time.monotonic() - t2 < args.settle:
                samples.append(proc_kib(proc.pid)["VmRSS"])
                time.sleep(2.0)
            peers = ask(home, "peers")
            after = proc_kib(proc.pid)
            metrics = parse_metrics(ask(home, "metrics"))
        finally:
            proc.terminate()
            proc.wait(20)
    out = {
        "records_signed": len(raws), "sign_s": round(signed_s, 1),
        "max_peers": Limits().max_peers, **fed,
        "node_peers_known": len(peers),
        "node_peers_alive": sum(1 for x in peers if x["alive"]),
        "node_limit_peer_store": sum(v for k, v in metrics.items()
                                     if k.startswith("blobmesh_space_limit_hits")
                                     and '"peer_store"' in k),
        "node_space_metrics": {k: v for k, v in metrics.items()
                               if k.startswith("blobmesh_space_")},
        "ingest_s": round(ingest_s, 1),
        "rss_before_mib": round(before["VmRSS"] / 1024, 1),
        "rss_after_mib": round(after["VmRSS"] / 1024, 1),
        "rss_settle_max_mib": round(max(samples) / 1024, 1) if samples else None,
        "rss_peak_mib": round(after["VmHWM"] / 1024, 1),
        "load": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:>24}: {v}")


def parse_metrics(text: str) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                metrics[name] = float(value)
            except ValueError:
                continue
    return metrics


if __name__ == "__main__":
    main()
