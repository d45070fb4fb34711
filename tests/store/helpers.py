"""Store test helpers: deterministic payloads, on-disk damage, real worker processes."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from blobmesh.hashing import BlobId
from blobmesh.store import Store

WORKER = Path(__file__).with_name("worker.py")


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def flip_byte(store: Store, blob_id: BlobId, offset: int) -> None:
    path = store.layout.data_path(blob_id)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def truncate(store: Store, blob_id: BlobId, size: int) -> None:
    with open(store.layout.data_path(blob_id), "r+b") as f:
        f.truncate(size)


def start_worker(*args: str) -> subprocess.Popen[str]:
    """A real process running ``worker.py`` with ``args`` (lines on stdout, stdin kept open)."""
    return subprocess.Popen([sys.executable, str(WORKER), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def run_worker(*args: str, timeout: float = 60) -> str:
    proc = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
