"""Adding many small blobs at once.

Each ``Store.add_bytes`` pays its own fsyncs and commit; run side by side, the fsyncs of
different blobs overlap and SQLite's WAL groups the commits that queue up behind its write
lock.  (A store-level group commit, one transaction and one fsync round for a whole batch,
would do better still; this uses only the store's public API.)
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from blobmesh.store import BlobInfo, LeaseId, Store

THREADS = 8  # measured: 4 -> 100, 8 -> 145, 16 -> 100 files/s of 16 KiB on a 2-core VM


def add_many(store: Store, items: Sequence[bytes], lease: LeaseId | None = None
             ) -> list[BlobInfo]:
    """Add every item; returns their infos in order."""
    if len(items) <= 1:
        return [store.add_bytes(data, lease) for data in items]
    with ThreadPoolExecutor(min(THREADS, len(items)), thread_name_prefix="blobmesh-bulk") as pool:
        return list(pool.map(lambda data: store.add_bytes(data, lease), items))
