"""Typed values of the distribution API: priorities, scopes, handles and status."""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from blobmesh.errors import BlobmeshError, PredicateError
from blobmesh.hashing import BlobId
from blobmesh.space.config import CapValue
from blobmesh.space.predicate import parse_predicate
from blobmesh.transport.identity import NodeId


class ScopeError(BlobmeshError, ValueError):
    """A scope string is malformed, or resolves to no node."""

    exit_code = 2


class Priority(enum.IntEnum):
    """Transfer priority; a higher value pre-empts a lower one."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3

    @classmethod
    def parse(cls, text: str) -> Priority:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(p.name.lower() for p in cls)
            raise ScopeError(f"unknown priority {text!r} (one of {names})") from None

    def __str__(self) -> str:
        return self.name.lower()


CapabilityMatcher = Callable[[Mapping[str, CapValue]], bool]


class ScopeKind(enum.StrEnum):
    ALL = "all"
    GROUP = "group"
    NODES = "node"
    CAPABILITY = "cap"


@dataclass(frozen=True, slots=True)
class Scope:
    """Which nodes a distribution targets.

    Text forms: ``all``, ``group:NAME``, ``node:ID[,ID...]``, ``cap:EXPR`` (a capability
    predicate such as ``gpu=true,mem_gb>=16``).
    """

    kind: ScopeKind
    group: str = ""
    nodes: tuple[NodeId, ...] = ()
    expr: str = ""

    @classmethod
    def all(cls) -> Scope:
        return cls(ScopeKind.ALL)

    @classmethod
    def of_group(cls, name: str) -> Scope:
        if not name:
            raise ScopeError("group scope needs a name: group:NAME")
        return cls(ScopeKind.GROUP, group=name)

    @classmethod
    def of_nodes(cls, nodes: tuple[NodeId, ...] | list[NodeId]) -> Scope:
        if not nodes:
            raise ScopeError("node scope needs at least one node id: node:ID[,ID]")
        return cls(ScopeKind.NODES, nodes=tuple(dict.fromkeys(nodes)))

    @classmethod
    def of_capability(cls, expr: str) -> Scope:
        _compile_predicate(expr)  # validate now: a bad predicate is the caller's error
        return cls(ScopeKind.CAPABILITY, expr=expr.strip())

    @classmethod
    def parse(cls, text: str) -> Scope:
        text = text.strip()
        kind, _, rest = text.partition(":")
        if kind == "all" and not rest:
            return cls.all()
        if kind == "group":
            return cls.of_group(rest)
        if kind == "node":
            return cls.of_nodes([NodeId.parse(p) for p in rest.split(",") if p.strip()])
        if kind == "cap":
            return cls.of_capability(rest)
        raise ScopeError(
            f"malformed scope {text!r}: use all, group:NAME, node:ID[,ID] or cap:EXPR")

    def __str__(self) -> str:
        if self.kind is ScopeKind.ALL:
            return "all"
        if self.kind is ScopeKind.GROUP:
            return f"group:{self.group}"
        if self.kind is ScopeKind.NODES:
            return "node:" + ",".join(str(n) for n in self.nodes)
        return f"cap:{self.expr}"

    def matches(self, node: NodeId, groups: tuple[str, ...] | list[str],
                capabilities: Mapping[str, CapValue]) -> bool:
        """Whether a node with these groups and capabilities is a target."""
        if self.kind is ScopeKind.ALL:
            return True
        if self.kind is ScopeKind.GROUP:
            return self.group in groups
        if self.kind is ScopeKind.NODES:
            return node in self.nodes
        return _compile_predicate(self.expr)(capabilities)


def _compile_predicate(expr: str) -> CapabilityMatcher:
    try:
        return parse_predicate(expr)
    except PredicateError as exc:
        raise ScopeError(str(exc)) from exc


class TargetState(enum.StrEnum):
    """Where one target stands.  Only ``completed``, ``failed`` and ``cancelled`` are final;
    every other state says why the target is not moving (``reason``) and may change back."""

    PENDING = "pending"
    TRANSFERRING = "transferring"
    QUEUED = "queued"  # waiting while a higher-priority distribution runs
    STALLED = "stalled"  # no progress for a while (no peer provides, node unreachable...)
    RETRYING = "retrying"  # the last attempt failed; trying again after a back-off
    WAITING_DISK = "waiting-for-disk"  # the target's disk is full; keeps what it has
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (TargetState.COMPLETED, TargetState.FAILED, TargetState.CANCELLED)


class DistributionState(enum.StrEnum):
    ACTIVE = "active"
    COMPLETED = "completed"  # every target completed
    FINISHED_WITH_FAILURES = "finished-with-failures"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True, order=True)
class DistributionHandle:
    """Names one distribution; the text form is ``d-`` plus 16 hex digits."""

    id: str

    @classmethod
    def new(cls) -> DistributionHandle:
        return cls("d-" + secrets.token_hex(8))

    @classmethod
    def parse(cls, text: str) -> DistributionHandle:
        text = text.strip()
        if len(text) != 18 or not text.startswith("d-") or \
                any(c not in "0123456789abcdef" for c in text[2:]):
            raise ScopeError(f"malformed distribution handle {text!r} (expected d- and 16 hex)")
        return cls(text)

    def __str__(self) -> str:
        return self.id


SOURCES_REPORTED = 8
"""At most this many source peers a target names in a progress report."""


@dataclass(frozen=True, slots=True)
class TargetStatus:
    """One target's progress."""

    node: NodeId
    state: TargetState = TargetState.PENDING
    bytes_done: int = 0
    rate: float = 0.0  # bytes/s over the last report interval
    reason: str = ""
    updated: float = field(default_factory=time.time)
    peers: int = 0  # swarm peers it was connected to at its last progress report
    sources: tuple[NodeId, ...] = ()  # peers it was receiving from then (most requests first)
    source_rates: tuple[float, ...] = ()  # bytes/s from each of ``sources`` (or none known)


@dataclass(frozen=True, slots=True)
class DistributionStatus:
    """A snapshot of a distribution: its targets and totals."""

    handle: DistributionHandle
    blob_id: BlobId
    size: int
    scope: Scope
    priority: Priority
    state: DistributionState
    targets: tuple[TargetStatus, ...]
    started: float
    finished: float | None = None
    export: str = ""  # a collection's targets write the tree to HOME/exports/<export>

    @property
    def total(self) -> int:
        return len(self.targets)

    def count(self, state: TargetState) -> int:
        return sum(1 for t in self.targets if t.state is state)

    @property
    def completed(self) -> int:
        return self.count(TargetState.COMPLETED)

    @property
    def failed(self) -> int:
        return self.count(TargetState.FAILED)

    @property
    def bytes_done(self) -> int:
        return sum(t.bytes_done for t in self.targets)

    @property
    def bytes_total(self) -> int:
        return self.size * len(self.targets)

    @property
    def done(self) -> bool:
        return self.state is not DistributionState.ACTIVE

    def target(self, node: NodeId) -> TargetStatus | None:
        return next((t for t in self.targets if t.node == node), None)
