"""Real processes for the multi-process and crash tests: ``python worker.py MODE HOME ...``."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from blobmesh.hashing import BlobId, hash_bytes
from blobmesh.store import LeaseId, Store
from blobmesh.store import ingest as store_module

# contents the mixed workers share, so that they add and collect the same blobs at once
SHARED_SIZES = [0, 10, 100_000, 1_300_000, 3 * 16384 + 7]


def shared_content(k: int) -> bytes:
    return random.Random(k).randbytes(SHARED_SIZES[k % len(SHARED_SIZES)])


def hold(home: str, blob: str) -> None:
    """Lease a blob, say so, and wait for stdin to close; then exit without any advice."""
    with Store(home) as store:
        store.lease_by_content(BlobId.parse(blob), LeaseId.new("holder"))
        print("held", flush=True)
        sys.stdin.read()


def read_during_gc(home: str, blob: str) -> None:
    """Open a reader, run a GC in a second store while it is open, then finish reading."""
    blob_id = BlobId.parse(blob)
    lease = LeaseId.new("reader")
    with Store(home) as store, store.get_reader(blob_id, lease) as reader:
        store.advise_lease_dropped(lease, blob_id)
        head = reader.read(10)
        with Store(home) as other:
            print(len(other.gc().deleted))
        assert hash_bytes(head + reader.read()) == blob_id
    print("ok", flush=True)


def mixed(home: str, seed: str, rounds: str) -> None:
    """Random adds, verified reads, pins, lease drops and GCs; checks what it holds."""
    rng = random.Random(seed)
    lease = LeaseId.new(f"worker{seed}")
    held: dict[BlobId, bytes] = {}
    pinned: dict[str, str] = {}
    with Store(home) as store:
        for r in range(int(rounds)):
            op = rng.random()
            if op < 0.35 or not held:
                data = shared_content(rng.randrange(12))
                held[store.add_bytes(data, lease).blob_id] = data
            elif op < 0.6:
                blob_id = rng.choice(list(held))
                assert store.get_data(blob_id, lease) == held[blob_id]
                with store.get_reader(blob_id, lease, verify=True) as reader:
                    reader.seek(len(held[blob_id]) // 2)
                    assert reader.read() == held[blob_id][len(held[blob_id]) // 2 :]
            elif op < 0.7:
                blob_id = rng.choice(list(held))
                name = f"w{seed}-{r}"
                store.pin(blob_id, name)
                pinned[name] = str(blob_id)
            elif op < 0.8:
                blob_id = rng.choice(list(held))
                store.advise_lease_dropped(lease, blob_id)
                del held[blob_id]
            else:
                store.gc()
        for blob_id, data in held.items():
            assert store.get_data(blob_id, lease) == data
    print(json.dumps(pinned), flush=True)


def slow_chunks(total_mb: int) -> Iterator[bytes]:
    """1 MiB chunks, announcing the middle of the add so the parent can kill us there."""
    for i in range(total_mb):
        if i == 4:
            print("adding", flush=True)
        yield random.Random(i).randbytes(1 << 20)
        time.sleep(0.02)


def add_slowly(home: str, total_mb: str) -> None:
    with Store(home) as store:
        store.add_stream(slow_chunks(int(total_mb)), LeaseId.new("adder"))
    print("added", flush=True)


def die_on_call(module: Any, name: str, after: int) -> None:
    """Replace ``module.name`` so that its call number ``after`` SIGKILLs this process."""
    original: Callable[..., Any] = getattr(module, name)
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls >= after:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def add_die_before_commit(home: str, size: str) -> None:
    """Die after the files of an add are in blobs/ but before the row is committed (content
    in memory is written there at the commit, one sync; a staged add syncs its temp files
    first)."""
    with Store(home) as store:
        die_on_call(store_module, "sync_paths", 1 if int(size) <= store_module.HELD_MAX else 2)
        store.add_bytes(random.Random(0).randbytes(int(size)))


def _twenty() -> list[bytes]:
    return [random.Random(i).randbytes(20_000 + i) for i in range(20)]


def add_many_die_before_commit(home: str) -> None:
    """Die after the files of a 20-blob ``add_many`` are all in blobs/, before the one
    commit."""
    with Store(home) as store:
        die_on_call(store_module, "sync_paths", 1)
        store.add_many(_twenty())


def add_many_die_writing(home: str, files: str) -> None:
    """Die in the commit of a 20-blob ``add_many`` once ``files`` of its files are in blobs/
    (the journal is the first file it writes)."""
    with Store(home) as store:
        die_on_call(store_module, "write_file", int(files) + 2)  # one file per blob
        store.add_many(_twenty())


def add_many_inline_die_before_commit(home: str) -> None:
    """Die inside the transaction of a 20-blob inline ``add_many``, its rows all inserted,
    just before the commit (when it reads back their infos)."""
    from blobmesh.store.db import MetaDB

    with Store(home) as store:
        die_on_call(MetaDB, "infos", 1)
        store.add_many(_twenty(), inline=True)


def add_many_die_after_commit(home: str) -> None:
    """Die right after the commit of a 20-blob ``add_many``, before its journal is removed
    (the first unlink of the add)."""
    with Store(home) as store:
        die_on_call(os, "unlink", 1)
        store.add_many(_twenty())


def lock_store(home: str, seconds: str) -> None:
    """Hold the store's SQLite write lock (as a GC or a big add would) for ``seconds``."""
    import sqlite3

    db = sqlite3.connect(os.path.join(home, "store.sqlite"), isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    time.sleep(float(seconds))
    db.execute("ROLLBACK")
    print("released", flush=True)


def gc_die_midway(home: str, moves: str) -> None:
    """Run a GC that dies after ``moves`` file moves into trash, before it commits."""
    with Store(home) as store:
        die_on_call(os, "replace", int(moves))
        store.gc()


def gc_loop(home: str) -> None:
    """Collect again and again until stdin has input (or closes); print how many rounds ran."""
    rounds = 0
    with Store(home) as store:
        print("collecting", flush=True)
        while not select.select([sys.stdin], [], [], 0)[0]:
            store.gc()
            rounds += 1
    print(rounds, flush=True)


MODES: dict[str, Callable[..., None]] = {
    "hold": hold,
    "read-during-gc": read_during_gc,
    "mixed": mixed,
    "add-slowly": add_slowly,
    "add-die-before-commit": add_die_before_commit,
    "gc-die-midway": gc_die_midway,
    "add-many-die-before-commit": add_many_die_before_commit,
    "add-many-die-writing": add_many_die_writing,
    "add-many-die-after-commit": add_many_die_after_commit,
    "add-many-inline-die-before-commit": add_many_inline_die_before_commit,
    "lock-store": lock_store,
    "gc-loop": gc_loop,
}


if __name__ == "__main__":
    mode, home, *args = sys.argv[1:]
    MODES[mode](home, *args)
