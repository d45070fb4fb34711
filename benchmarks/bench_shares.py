"""Load a shared blob from nginx on loopback, verified and stored, against ``curl``.

    .venv/bin/python benchmarks/bench_shares.py [--size-mb 1024] [--runs 5] [--dir DIR]

Each run downloads the blob's data file with ``curl -o`` and loads it with
:func:`blobmesh.shares.load_blob` into a fresh store (which verifies every piece and fsyncs
as it goes); it also times ``curl`` plus one fsync of its output, the same durability the
store gives.  Prints the medians and the ratio of load throughput to curl's (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the tests' nginx runner

from tests.shares.conftest import run_nginx

from blobmesh.hashing import BlobId
from blobmesh.shares import ShareDir, load_blob
from blobmesh.store import Store

MiB = 1024 * 1024


def curl(url: str, out: Path, sync: bool) -> float:
    started = time.perf_counter()
    subprocess.run(["curl", "-sSf", "-o", str(out), url], check=True)
    if sync:
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - started
    out.unlink()
    return elapsed


def load(url: str, blob_id: BlobId, home: Path) -> float:
    started = time.perf_counter()
    with Store(home) as store:
        asyncio.run(load_blob(store, blob_id, [url])).close()
    elapsed = time.perf_counter() - started
    shutil.rmtree(home)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None,
                        help="work directory (default: a temp dir under the current one)")
    args = parser.parse_args()
    size = args.size_mb * MiB
    work = Path(tempfile.mkdtemp(prefix="bench-shares-", dir=args.dir or Path.cwd()))
    try:
        with Store(work / "src") as store:
            source = work / "input"
            with open(source, "wb") as f:
                for left in range(size, 0, -64 * MiB):
                    f.write(os.urandom(min(left, 64 * MiB)))
            blob_id = store.add_path(source).blob_id
            source.unlink()
            ShareDir(work / "share").share(store, blob_id)
        times: dict[str, list[float]] = {"curl": [], "curl+fsync": [], "load": []}
        with run_nginx(work / "share", work / "nginx") as url:
            data_url = f"{url}/blobs/{blob_id}/data"
            for run in range(args.runs):
                times["curl"].append(curl(data_url, work / "curl.out", sync=False))
                times["load"].append(load(url, blob_id, work / f"dest{run}"))
                times["curl+fsync"].append(curl(data_url, work / "curl.out", sync=True))
                print(f"run {run + 1}: " + "  ".join(f"{k} {v[-1]:.2f} s"
                                                     for k, v in times.items()), flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        for name, t in med.items():
            print(f"median {name:>10}: {t:6.2f} s  {size / MiB / t:7.0f} MiB/s")
        print(f"load / curl throughput: {med['curl'] / med['load']:.2f}x (goal >= 0.8); "
              f"load / (curl + fsync): {med['curl+fsync'] / med['load']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
