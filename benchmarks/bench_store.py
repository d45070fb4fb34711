"""Store add throughput against the machine's own limits, and the adding process's peak RSS.

    .venv/bin/python benchmarks/bench_store.py [--size-mb 1024] [--runs 3] [--rss-mb 1024 4096]

In one run it measures, on the same file: (a) raw BLAKE3 of the file (one hasher, large reads),
(b) a plain copy of it with fsync, and ``Store.add_path`` in a fresh child process (so its peak
RSS is its own).  Each figure is the median of ``--runs``; the three are interleaved so machine
noise hits them alike.  The source stays in the page cache for all three (it was just written);
the copy and the add both pay for writing and fsyncing to the disk of ``--dir``.
Goal: add >= 0.7 x min(a, b); peak RSS < 150 MiB and flat in blob size.

Then, in a home on tmpfs (``--tmpfs``; the disk is not the limit), the piece path a transfer
uses: every piece written with ``PartialBlob.write_piece`` (verified, pwrite, flushed) and read
back with ``PieceReader.read`` (pread, verified), against hashing the same pieces alone; and
``--small`` 16 KiB blobs added one ``add_bytes`` at a time against one ``add_many``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blake3

MiB = 1024 * 1024
GiB = 1024 * MiB
READ = 16 * MiB

# Runs in the child: add one file to a fresh store; report seconds and peak RSS (KiB).  The
# peak is VmHWM of the child's own address space: ru_maxrss would include the parent's RSS,
# which Linux carries over into the child through fork and exec.
_ADD = """
import json, sys, time
from blobmesh.store import Store
t = time.perf_counter()
with Store(sys.argv[1]) as store:
    store.add_path(sys.argv[2])
seconds = time.perf_counter() - t
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "maxrss_kib": hwm}))
"""


def make_source(path: Path, size: int, *, sparse: bool = False) -> None:
    with open(path, "wb") as f:
        if sparse:
            f.truncate(size)
            return
        chunk = os.urandom(64 * MiB)
        left = size
        while left:
            left -= f.write(chunk[: min(left, len(chunk))])


def raw_blake3(src: Path) -> float:
    t = time.perf_counter()
    h = blake3.blake3()
    with open(src, "rb", buffering=0) as f:
        while chunk := f.read(READ):
            h.update(chunk)
    h.digest()
    return time.perf_counter() - t


def copy_fsync(src: Path, dst: Path) -> float:
    t = time.perf_counter()
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        while chunk := fin.read(READ):
            fout.write(chunk)
        os.fsync(fout.fileno())
    seconds = time.perf_counter() - t
    dst.unlink()
    return seconds


def store_add(src: Path, home: Path) -> tuple[float, int]:
    """Seconds of the add (inside the child) and the child's peak RSS in bytes."""
    shutil.rmtree(home, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", _ADD, str(home), str(src)], check=True,
                         capture_output=True, text=True).stdout
    shutil.rmtree(home, ignore_errors=True)
    result = json.loads(out)
    return float(result["seconds"]), int(result["maxrss_kib"]) * 1024


def piece_path(src: Path, home: Path) -> dict[str, float]:
    """GiB/s of writing and reading back every piece of ``src`` through the store, and of
    only hashing them (the piece-hash ceiling both share)."""
    from blobmesh.hashing import hash_stream
    from blobmesh.hashing.tree import choose_piece_size
    from blobmesh.store import LeaseId, PieceReader, Store

    data = src.read_bytes()
    layer = hash_stream([data], choose_piece_size(len(data)))[1]
    pieces = [memoryview(data)[a : a + n] for a, n in map(layer.piece_range, range(len(layer)))]
    shutil.rmtree(home, ignore_errors=True)
    out: dict[str, float] = {}
    with Store(home) as store:
        t = time.perf_counter()
        for i, piece in enumerate(pieces):
            layer.verify_piece(i, piece)
        out["hash_only_gib_s"] = len(data) / (time.perf_counter() - t) / GiB
        t = time.perf_counter()
        with store.begin_partial(layer, LeaseId.new("bench")) as partial:
            for i, piece in enumerate(pieces):
                partial.write_piece(i, piece)
        out["write_pieces_gib_s"] = len(data) / (time.perf_counter() - t) / GiB
        reader = PieceReader(store, layer, verify=True)
        t = time.perf_counter()
        for i in range(len(layer)):
            reader.read(i)
        out["read_pieces_gib_s"] = len(data) / (time.perf_counter() - t) / GiB
        reader.close()
    shutil.rmtree(home, ignore_errors=True)
    return out


def small_adds(home: Path, count: int) -> dict[str, float]:
    """Blobs/s of 16 KiB blobs added one transaction each, and all in one ``add_many``."""
    from blobmesh.store import Store

    blobs = [os.urandom(16 * 1024) for _ in range(count)]
    out: dict[str, float] = {}
    for name, many in (("add_bytes_per_s", False), ("add_many_per_s", True)):
        shutil.rmtree(home, ignore_errors=True)
        with Store(home) as store:
            t = time.perf_counter()
            if many:
                store.add_many(blobs)
            else:
                for b in blobs:
                    store.add_bytes(b)
            out[name] = count / (time.perf_counter() - t)
    shutil.rmtree(home, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="file size (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs per measure (median)")
    parser.add_argument("--rss-mb", type=int, nargs="*", default=[],
                        help="extra sizes (MiB) to measure the add's peak RSS at, e.g. 4096")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (disk under test)")
    parser.add_argument("--tmpfs", type=Path, default=Path("/dev/shm"),
                        help="where the piece-path and small-blob homes go (default /dev/shm)")
    parser.add_argument("--small", type=int, default=2000, help="16 KiB blobs to add")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    try:
        size = args.size_mb * MiB
        src = work / "source.bin"
        make_source(src, size)
        hashing, copying, adding, rss = [], [], [], []
        for _ in range(args.runs):
            # settle the dirty pages of the previous step, so each pays only for its own
            os.sync()
            hashing.append(raw_blake3(src))
            os.sync()
            copying.append(copy_fsync(src, work / "copy.bin"))
            os.sync()
            seconds, peak = store_add(src, work / "home")
            adding.append(seconds)
            rss.append(peak)
        runs = {"blake3": hashing, "copy": copying, "add": adding}
        rate = {name: size / MiB / statistics.median(times) for name, times in runs.items()}
        limit = min(rate["blake3"], rate["copy"])
        print(f"file: {args.size_mb} MiB in {work}, {args.runs} run(s): median MiB/s "
              f"[each run's MiB/s, to show the noise]")
        for label, name in (("(a) raw blake3", "blake3"), ("(b) copy + fsync", "copy"),
                            ("store add", "add")):
            each = " ".join(f"{size / MiB / t:.0f}" for t in runs[name])
            print(f"  {label:<20} {rate[name]:8.0f}   [{each}]")
        print(f"  add / (a) = {rate['add'] / rate['blake3']:.2f}, "
              f"add / (b) = {rate['add'] / rate['copy']:.2f}")
        ratio = rate["add"] / limit
        print(f"  add / min(a, b)       {ratio:8.2f}   (goal >= 0.70: "
              f"{'met' if ratio >= 0.7 else 'NOT met'})")
        peaks = {args.size_mb: max(rss)}
        for extra in args.rss_mb:
            big = work / f"rss-{extra}.bin"
            make_source(big, extra * MiB, sparse=True)  # content does not change memory use
            peaks[extra] = store_add(big, work / "home")[1]
            big.unlink()
        for mb, peak in sorted(peaks.items()):
            print(f"  peak RSS of add at {mb:6d} MiB: {peak / MiB:6.1f} MiB "
                  f"(goal < 150: {'met' if peak < 150 * MiB else 'NOT met'})")
        tmp_home = args.tmpfs / f"{work.name}-home"
        paths = [piece_path(src, tmp_home) for _ in range(args.runs)]
        print(f"  piece path on {args.tmpfs}, median GiB/s: " + ", ".join(
            f"{k} {statistics.median(p[k] for p in paths):.2f}" for k in paths[0]))
        smalls = [small_adds(tmp_home, args.small) for _ in range(args.runs)]
        print(f"  {args.small} small blobs on {args.tmpfs}, median blobs/s: " + ", ".join(
            f"{k} {statistics.median(p[k] for p in smalls):.0f}" for k in smalls[0]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
