"""Adding many small blobs at once.

``Store.add_many`` commits a batch in one transaction (one WAL fsync) but still fsyncs each
blob's files one after the other; a few batches side by side overlap those fsyncs too.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from blobmesh.store import BlobInfo, LeaseId, Store

THREADS = 8  # 16 KiB blobs on a 2-core VM: 4 -> 349, 8 -> 402, 16 -> 415 per second


def add_many(store: Store, items: Sequence[bytes], lease: LeaseId | None = None
             ) -> list[BlobInfo]:
    """Add every item (in ``THREADS`` group commits); returns their infos in order."""
    if len(items) < 2 * THREADS:
        return store.add_many(items, lease)
    step = -(-len(items) // THREADS)
    chunks = [items[i : i + step] for i in range(0, len(items), step)]
    with ThreadPoolExecutor(len(chunks), thread_name_prefix="blobmesh-bulk") as pool:
        return [info for infos in pool.map(lambda c: store.add_many(c, lease), chunks)
                for info in infos]
