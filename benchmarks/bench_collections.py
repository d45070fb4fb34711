"""Collections over a real fleet on loopback: a model directory against one blob of the same
size, a v2 moving only its changed pieces, and many small files.

    .venv/bin/python benchmarks/bench_collections.py [--shards 8 --shard-mb 128 --small 50]
        [--files 2000 --file-kb 16] [--targets 3]

One source and ``--targets`` targets (real ``blobmesh node run`` processes) in one run:

1. the "model" directory (``--shards`` files of ``--shard-mb`` + ``--small`` small files) is
   distributed to every target, and so is one blob of the same total size; the ratio of the
   two times (request to the last target completed) should be <= 1.1;
2. v2 of the model, 10 % of the pieces of 3 shards rewritten in place: bytes moved (swarm
   bytes received per target) over the bytes changed should be <= 1.2;
3. ``--files`` files of ``--file-kb`` KiB: files delivered per second per target (from the
   request to that target's completion) should be >= 1,000.

On a loaded shared machine scale the sizes down (e.g. ``--shard-mb 16``); the ratios are what
count, each measured against its reference in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import tempfile
import time
from pathlib import Path

from blobmesh.collection import add_tree
from blobmesh.distribution.model import DistributionState, DistributionStatus
from blobmesh.hashing import BlobId
from blobmesh.node.client import NodeClient
from blobmesh.node.fleet import Fleet, FleetNode
from blobmesh.store import Store

MiB = 1024 * 1024
PIECE = 256 * 1024
_DOWNLOADED = re.compile(r"^blobmesh_swarm_downloaded_bytes_total (\S+)$", re.M)


def write_model(root: Path, shards: int, shard_mb: int, small: int) -> int:
    (root / "shards").mkdir(parents=True)
    for i in range(shards):
        with open(root / "shards" / f"model-{i:05}.safetensors", "wb") as f:
            for _ in range(shard_mb):
                f.write(os.urandom(MiB))
    for i in range(small):
        (root / f"meta-{i:02}.json").write_bytes(os.urandom(1024 + 997 * i))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def rewrite_pieces(path: Path, fraction: float) -> int:
    """Rewrite ``fraction`` of a file's whole pieces in place, spread over it."""
    npieces = path.stat().st_size // PIECE
    step = max(1, round(1 / fraction))
    changed = 0
    with open(path, "r+b") as f:
        for i in range(0, npieces, step):
            f.seek(i * PIECE)
            f.write(os.urandom(PIECE))
            changed += PIECE
    return changed


def durable_files_per_s(where: Path, count: int = 400, size: int = 16 * 1024) -> float:
    """The disk's reference: small files written and fsynced by 16 threads at once (a stored
    blob costs at least one such file)."""
    from concurrent.futures import ThreadPoolExecutor

    where.mkdir()
    data = os.urandom(size)

    def one(i: int) -> None:
        fd = os.open(where / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(count)))
    return count / (time.perf_counter() - t0)


async def downloaded(node: FleetNode) -> int:
    async with NodeClient(node.home) as c:
        m = _DOWNLOADED.search(await c.metrics())
    assert m is not None
    return int(float(m.group(1)))


async def distribute(src: FleetNode, blob: BlobId) -> DistributionStatus:
    async with NodeClient(src.home) as c:
        status = await c.distribute(str(blob), "all", "normal")
        final = status
        async for s in c.events(str(status.handle)):
            final = s
    if final.state is not DistributionState.COMPLETED:
        raise SystemExit(f"distribution did not complete: {final}")
    return final


def elapsed(s: DistributionStatus) -> float:
    return max(t.updated for t in s.targets) - s.started


def add_dir(node: FleetNode, root: Path) -> BlobId:
    with Store(node.home) as store:
        return add_tree(store, root).collection_id


async def bench(args: argparse.Namespace, work: Path) -> None:
    (work / "fleet").mkdir()
    with Fleet(work / "fleet") as fleet:
        src = fleet.add()
        targets = [fleet.add() for _ in range(args.targets)]
        fleet.start()
        await fleet.wait_converged(30)

        model = work / "model"
        total = write_model(model, args.shards, args.shard_mb, args.small)
        cid = add_dir(src, model)
        with Store(src.home) as store:  # one blob of the same size
            blob = store.add_stream(os.urandom(min(MiB, total - i))
                                    for i in range(0, total, MiB)).blob_id
        t_blob = elapsed(await distribute(src, blob))
        t_tree = elapsed(await distribute(src, cid))
        print(f"1. model dir {args.shards} x {args.shard_mb} MiB + {args.small} small "
              f"({total / MiB:.0f} MiB) to {args.targets}: {t_tree:.2f}s; one blob of the same "
              f"size {t_blob:.2f}s; ratio {t_tree / t_blob:.2f} (limit 1.10)")

        before = [await downloaded(t) for t in targets]
        shards = sorted((model / "shards").iterdir())[:3]
        changed = sum(rewrite_pieces(s, 0.10) for s in shards)
        v2 = add_dir(src, model)
        await distribute(src, v2)
        moved = [await downloaded(t) - b for t, b in zip(targets, before, strict=True)]
        worst = max(moved)
        print(f"2. v2, 10 % of the pieces of 3 shards rewritten ({changed / MiB:.1f} MiB "
              f"changed): moved per target {', '.join(f'{m / MiB:.1f}' for m in moved)} MiB; "
              f"bytes moved / changed bytes {worst / changed:.2f} (limit 1.20)")

        files = work / "files"
        files.mkdir()
        for i in range(args.files):  # 100 files per directory
            sub = files / f"{i // 100:02}"
            sub.mkdir(exist_ok=True)
            (sub / f"f{i:05}.bin").write_bytes(os.urandom(args.file_kb * 1024))
        fid = add_dir(src, files)
        disk = durable_files_per_s(work / "fsync-probe")
        t0 = time.monotonic()
        status = await distribute(src, fid)
        per_target = [args.files / (t.updated - status.started) for t in status.targets]
        print(f"3. {args.files} files of {args.file_kb} KiB to {args.targets}: "
              f"{', '.join(f'{r:.0f}' for r in per_target)} files/s per target "
              f"(slowest {min(per_target):.0f}; goal >= 1000; wall {time.monotonic() - t0:.1f}s); "
              f"this disk writes+fsyncs {disk:.0f} small files/s with 16 threads")
        print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
              f"{os.getloadavg()[2]:.2f} on {os.cpu_count()} CPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-mb", type=int, default=128)
    parser.add_argument("--small", type=int, default=50)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--file-kb", type=int, default=16)
    parser.add_argument("--targets", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-collections-") as tmp:
        asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()
