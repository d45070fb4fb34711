"""The main job, runnable as ``./dev demo``: a short, self-checking tour of blobmesh."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from blobmesh.cli.output import byte_progress, console, human_bytes
from blobmesh.store import LeaseId, Store


def store_demo(size: int) -> int:
    with tempfile.TemporaryDirectory(prefix="blobmesh-demo-") as tmp:
        src = Path(tmp) / "payload.bin"
        console.print(f"[bold]blobmesh demo[/]: generating a {human_bytes(size)} file")
        with open(src, "wb") as f:
            left = size
            while left:
                n = min(left, 1 << 20)
                f.write(os.urandom(n))
                left -= n
        with Store(Path(tmp) / "home") as store, byte_progress() as progress:
            task = progress.add_task("add", total=size)
            t0 = time.perf_counter()
            info = store.add_path(src, LeaseId.new("demo"),
                                  progress=lambda n: progress.advance(task, n))
            dt = time.perf_counter() - t0
            console.print(f"added {info.blob_id} ({human_bytes(size)}) in {dt:.2f}s "
                          f"= {human_bytes(size / dt)}/s, {info.pieces_total} pieces")
            again = store.add_path(src)
            console.print(f"re-adding deduplicates: same id = {again.blob_id == info.blob_id}")
            out = Path(tmp) / "export.bin"
            store.export(info.blob_id, out)
            same = out.read_bytes() == src.read_bytes()
            console.print(f"verified export matches: {same}")
            report = store.fsck()
            console.print(f"fsck: {report.checked} blob(s) ok = {report.ok}")
            return 0 if same and report.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blobmesh-demo")
    parser.add_argument("--size-mb", type=int, default=64)
    args = parser.parse_args(argv)
    return store_demo(args.size_mb * 1024 * 1024)


if __name__ == "__main__":
    sys.exit(main())
