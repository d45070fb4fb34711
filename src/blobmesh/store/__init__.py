"""The content-addressed blob store: dedup, partial blobs, leases, pins, GC and fsck.

Synchronous code (the CLI, tools, worker threads) uses :class:`Store`.  **Async code uses
``store.aio``** (an :class:`AsyncStore`, one per store) and never calls a ``Store`` method on
the event loop: a store whose SQLite write lock another process holds (a GC, a big add) then
delays only the store work queued behind it, never probes, gossip or progress.

``AsyncStore`` in short (every method is awaited; errors are the ``Store`` ones)::

    aio = store.aio
    await aio.has(blob) / info(blob) / blobs() / pins()
    await aio.bitfield(blob) -> Bitfield | None       # None: not here at all
    await aio.piece_layer(blob) -> PieceLayer | None
    await aio.pin(blob, name) / unpin(name) / lease_by_content(blob, lease)
    await aio.advise_lease_dropped(lease, blob)
    await aio.add_bytes(data, lease, expected=blob_id)  # group-committed with other calls
    await aio.add_many(sources, lease)                # Store.add_many on an I/O thread
    partial = await aio.begin_partial(layer, lease)
    await aio.io(partial.write_piece, index, data)    # piece data: I/O threads
    await aio.flush(partial) -> Bitfield              # group-committed with other flushes
    await aio.close_partial(partial)
    reader = await aio.piece_reader(layer, verify=True)
    data = await aio.io(reader.read, index); await aio.io(reader.close)
    await aio.verify(blob, lease, max_age=s) -> bool  # rehash unless verified recently
    await aio.get_reader(blob, lease) / meta(fn, *args)  # anything else, metadata thread

``Store.add_many(sources, lease=None) -> list[BlobInfo]`` adds many blobs (each source is the
content as bytes, or a path to a file) in one transaction: all become visible at once or none
do (an error or a crash leaves nothing), and the cost is one commit and one fsync per blob
file rather than a commit each.  Infos come back in the order of the sources; duplicates are
stored once.
"""

from blobmesh.store.aio import AsyncStore
from blobmesh.store.layout import HOME_ENV, default_home
from blobmesh.store.leases import LeaseId, pid_alive
from blobmesh.store.partial import PartialBlob
from blobmesh.store.piece_reader import PieceReader
from blobmesh.store.readers import BlobReader
from blobmesh.store.store import AddSource, Store
from blobmesh.store.types import BlobInfo, FsckProblem, FsckReport, GcReport, Pin, Progress
from blobmesh.types import Bitfield

__all__ = [
    "HOME_ENV",
    "AddSource",
    "AsyncStore",
    "Bitfield",
    "BlobInfo",
    "BlobReader",
    "FsckProblem",
    "FsckReport",
    "GcReport",
    "LeaseId",
    "PartialBlob",
    "PieceReader",
    "Pin",
    "Progress",
    "Store",
    "default_home",
    "pid_alive",
]
