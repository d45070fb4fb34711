"""The content-addressed blob store: dedup, partial blobs, leases, pins, GC and fsck."""

from blobmesh.store.bitfield import Bitfield
from blobmesh.store.layout import HOME_ENV, default_home
from blobmesh.store.leases import LeaseId, pid_alive
from blobmesh.store.partial import PartialBlob
from blobmesh.store.piece_reader import PieceReader
from blobmesh.store.readers import BlobReader
from blobmesh.store.store import Store
from blobmesh.store.types import BlobInfo, FsckProblem, FsckReport, GcReport, Pin, Progress

__all__ = [
    "HOME_ENV",
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
