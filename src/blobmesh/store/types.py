"""The values the store hands out: blob info, pins and the reports of GC and fsck."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from blobmesh.hashing import BlobId

Progress = Callable[[int], None]
"""Called with the number of bytes just processed."""


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What the store knows about one blob."""

    blob_id: BlobId
    size: int
    piece_size: int
    complete: bool
    pieces_present: int
    pieces_total: int
    created: float
    bytes_present: int
    pins: tuple[str, ...] = ()
    leases: int = 0


@dataclass(frozen=True, slots=True)
class Pin:
    name: str
    blob_id: BlobId
    created: float


@dataclass(slots=True)
class GcReport:
    deleted: list[BlobId] = field(default_factory=list)
    bytes_freed: int = 0
    dead_leases_dropped: int = 0
    kept: int = 0


@dataclass(slots=True)
class FsckProblem:
    kind: str  # "corrupt", "missing", "truncated", "orphan", "bad-pieces"
    path: str
    blob_id: BlobId | None = None
    detail: str = ""


@dataclass(slots=True)
class FsckReport:
    checked: int = 0
    bytes_checked: int = 0
    problems: list[FsckProblem] = field(default_factory=list)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems
