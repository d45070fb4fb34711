"""The JSON the CLI prints with ``--json``, one schema per output (``docs/distribution.md``,
"JSON output"): ids are named by kind (``blob``, ``node``, ``handle``), sizes are integers in
bytes, times are Unix seconds.  ``check`` fails on a missing, extra or mistyped field."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

T = TypeVar("T")
CapValue = bool | int | float | str


class Strict(msgspec.Struct, forbid_unknown_fields=True):
    pass


class BlobInfo(Strict):
    blob: str
    size: int
    piece_size: int
    complete: bool
    pieces_present: int
    pieces_total: int
    pins: list[str]
    leases: int
    created_at: float


class Added(BlobInfo):
    path: str


class CollectionSummary(Strict):
    entries: int
    files: int
    total_size: int
    members: int
    members_present: int
    bytes_present: int
    complete: bool


class CollectionInfo(BlobInfo):
    """``ls --json`` / ``info --json`` of a collection: a blob with its tree's summary."""

    collection: CollectionSummary


class AddedCollection(Strict):
    """``add DIR --json``: one per directory."""

    blob: str
    path: str
    entries: int
    files: int
    total_size: int
    new_blobs: int
    new_bytes: int


class Pin(Strict):
    name: str
    blob: str
    created_at: float


class Gc(Strict):
    deleted: list[str]
    bytes_freed: int
    dead_leases_dropped: int
    partial_kept: int
    dry_run: bool


class Problem(Strict):
    kind: str
    path: str
    detail: str
    blob: str | None


class Fsck(Strict):
    checked: int
    bytes_checked: int
    ok: bool
    repaired: bool
    problems: list[Problem]


class Target(Strict):
    node: str
    state: str
    bytes_done: int
    rate: float
    reason: str
    updated: float
    peers: int
    sources: list[str]
    source_rates: list[float]


class Totals(Strict):
    targets: int
    completed: int
    failed: int
    bytes_done: int
    bytes_total: int


class Status(Strict):
    handle: str
    blob: str
    size: int
    scope: str
    priority: str
    state: str
    started: float
    finished: float | None
    export: str | None
    totals: Totals
    targets: list[Target]


class Pruned(Strict):
    pruned: list[str]


class Peer(Strict):
    node: str
    addresses: list[str]
    groups: list[str]
    capabilities: dict[str, CapValue]
    alive: bool
    last_seen_at: float | None
    expires_at: float


class StoreUsage(Strict):
    blobs: int
    partial_blobs: int
    bytes: int


class NodeInfo(Strict):
    node: str
    ticket: str
    addresses: list[str]
    listen: str
    version: str
    space: str
    groups: list[str]
    capabilities: dict[str, CapValue]
    home: str
    pid: int
    started_at: float
    uptime_seconds: float
    peers_alive: int
    store: StoreUsage


class Transferred(Strict):
    blob: str
    peer: str
    bytes: int
    total: int
    wire_bytes: int
    restarts: int
    elapsed_seconds: float
    output: str | None


class AlreadyPresent(Strict):
    blob: str
    already_present: bool


def check(obj: Any, schema: type[T]) -> T:
    """``obj`` as ``schema``, or an AssertionError naming the first mismatch."""
    try:
        return msgspec.convert(obj, schema)
    except msgspec.ValidationError as exc:
        raise AssertionError(f"{schema.__name__}: {exc}: {obj!r}") from None
