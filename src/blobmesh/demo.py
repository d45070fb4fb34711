"""The main job, run by ``./dev demo``: a local fleet distributing a file, with live progress.

Starts N real node processes on loopback (``blobmesh node run``), bootstrapped from the first,
adds a generated file on the first, distributes it to the whole fleet through the swarm, shows
each target's progress, verifies every copy against its blob id, prints a summary and shuts
the fleet down cleanly (each node leaves the space with a tombstone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.live import Live
from rich.table import Table

from blobmesh.cli.node_cmds import render_status
from blobmesh.cli.output import byte_progress, console, human_bytes
from blobmesh.distribution.model import DistributionStatus
from blobmesh.errors import BlobmeshError
from blobmesh.node.client import NodeClient
from blobmesh.node.fleet import Fleet
from blobmesh.store import LeaseId, Store


def make_payload(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
            block = block[1:] + block[:1]  # different content per block, cheaply


async def distribute(fleet: Fleet, blob: str, scope: str, timeout: float
                     ) -> DistributionStatus:
    async with NodeClient(fleet.nodes[0].home) as client:
        status = await client.distribute(blob, scope, "normal")
        with Live(render_status(status), console=console, refresh_per_second=10) as live:
            async def follow() -> DistributionStatus:
                final = status
                async for s in client.events(str(status.handle)):
                    final = s
                    live.update(render_status(s))
                return final

            final = await asyncio.wait_for(follow(), timeout)
        console.print()
        return final


def verify_copies(fleet: Fleet, blob_text: str) -> list[tuple[int, bool, str]]:
    from blobmesh.hashing import BlobId

    blob_id = BlobId.parse(blob_text)
    results = []
    for i, node in enumerate(fleet.nodes):
        try:
            with Store(node.home) as store, \
                    store.get_reader(blob_id, LeaseId.new("demo-verify"), verify=True) as r:
                while r.read(4 << 20):
                    pass
            results.append((i, True, "verified"))
        except BlobmeshError as exc:
            results.append((i, False, str(exc)))
    return results


async def run(nodes: int, size: int, scope: str, timeout: float) -> int:
    with tempfile.TemporaryDirectory(prefix="blobmesh-demo-") as tmp:
        root = Path(tmp)
        fleet = Fleet(root)
        for i in range(nodes):
            fleet.add(groups=["demo"], caps=[f"index={i}"])
        console.print(f"[bold]blobmesh demo[/]: {nodes} nodes on loopback, "
                      f"{human_bytes(size)} to scope '{scope}'")
        try:
            t0 = time.perf_counter()
            fleet.start()
            await fleet.wait_converged()
            console.print(f"fleet of {nodes} up and converged in "
                          f"{time.perf_counter() - t0:.1f}s", highlight=False)
            payload = root / "payload.bin"
            make_payload(payload, size)
            with Store(fleet.nodes[0].home) as store, byte_progress() as progress:
                task = progress.add_task("add", total=size)
                info = store.add_path(payload, progress=lambda n: progress.advance(task, n))
            console.print(f"added {info.blob_id} on node 0 ({info.pieces_total} pieces)")
            t1 = time.perf_counter()
            final = await distribute(fleet, str(info.blob_id), scope, timeout)
            elapsed = time.perf_counter() - t1
            checks = verify_copies(fleet, str(info.blob_id))
        finally:
            fleet.stop()
        summary = Table(title="summary", title_justify="left")
        for column in ("node", "node id", "done after", "throughput", "copy"):
            summary.add_column(column)
        for (i, ok, note), node in zip(checks, fleet.nodes, strict=True):
            target = next((t for t in final.targets if str(t.node) == node.node_id), None)
            took = target.updated - final.started if target is not None else None
            summary.add_row(
                f"node{i}" + (" (source)" if i == 0 else ""), node.node_id[:16] + "…",
                f"{took:.2f}s" if took else "",
                f"{human_bytes(size / took)}/s" if took else "",
                f"[green]{note}[/]" if ok else f"[red]{note}[/]")
        console.print(summary)
        delivered = final.completed * size
        console.print(f"{final.state}: {final.completed}/{final.total} targets in "
                      f"{elapsed:.2f}s; {human_bytes(delivered)} delivered = "
                      f"{human_bytes(delivered / elapsed)}/s aggregate", highlight=False)
        ok = all(ok for _, ok, _ in checks) and final.completed == final.total
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blobmesh-demo", description=__doc__)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--scope", default="all")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes must be at least 2")
    try:
        return asyncio.run(run(args.nodes, args.size_mb * 1024 * 1024, args.scope, args.timeout))
    except BlobmeshError as exc:
        sys.stderr.write(f"demo: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            sys.stderr.write("demo: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
