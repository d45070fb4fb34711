"""Store test helpers: deterministic payloads, on-disk damage, real worker processes."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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


def failing_db(store: Store, monkeypatch: pytest.MonkeyPatch,
               fails: Callable[[str], BaseException | None]) -> sqlite3.Connection:
    """Give ``store`` a connection that raises ``fails(sql)`` for statements it returns one for."""
    real_execute = sqlite3.Connection.execute

    class Failing(sqlite3.Connection):
        def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
            exc = fails(sql)
            if exc is not None:
                raise exc
            return real_execute(self, sql, parameters)

    db = sqlite3.connect(store.layout.db, isolation_level=None, factory=Failing,
                         check_same_thread=False)
    monkeypatch.setattr(store.db, "conn", db)
    return db


def start_worker(*args: str) -> subprocess.Popen[str]:
    """A real process running ``worker.py`` with ``args`` (lines on stdout, stdin kept open)."""
    return subprocess.Popen([sys.executable, str(WORKER), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def run_worker(*args: str, timeout: float = 60) -> str:
    proc = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
