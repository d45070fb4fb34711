"""The distribution service: put a blob on every node a scope names, and watch it happen.

A distribution is a *desired state* recorded as a signed op (``dist/request``) in the space.
Every node watches those ops; a node inside the scope that lacks the blob downloads it through
the swarm (from the source and from other targets) and reports its state to the distributor
only, in progress notifications; the distributor asks a target that fell silent where it
stands, and publishes one ``dist/summary`` op when the distribution is finished, so no node's
op store grows with the number of targets.  Nodes that join the scope later (a late joiner, a
new capability) pick up still-active distributions the same way.  ``dist/cancel`` ends one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Protocol, TypeVar

import msgspec

from blobmesh.distribution.authz import OpAuthorizer
from blobmesh.distribution.collection import FetchRequest, PlanFetcher, Planner, plan_export
from blobmesh.distribution.model import (
    SOURCES_REPORTED,
    DistributionHandle,
    DistributionState,
    DistributionStatus,
    Priority,
    Scope,
    ScopeError,
    TargetState,
    TargetStatus,
)
from blobmesh.distribution.progress import (
    PROGRESS_INTERVAL,
    QUERY_AFTER,
    SOURCE_NOTES_PER_S,
    NoteSchedule,
    query_after,
    targets_to_query,
)
from blobmesh.distribution.swarm import JobProgress, SwarmEngine
from blobmesh.errors import (
    BlobmeshError,
    BlobNotFoundError,
    CollectionError,
    CorruptBlobError,
    InvalidOpError,
    NotAuthorizedError,
    StoreError,
    TransferError,
)
from blobmesh.hashing import BlobId
from blobmesh.store import LeaseId
from blobmesh.tasks import TaskOwner
from blobmesh.transport.identity import NodeId

log = logging.getLogger(__name__)

OP_REQUEST = "dist/request"
OP_SUMMARY = "dist/summary"
OP_CANCEL = "dist/cancel"
WATCHED = (OP_REQUEST, OP_SUMMARY, OP_CANCEL)
NOTIFY_PROGRESS = b"dp"
NOTIFY_QUERY = b"dq"  # the source asks a target for a progress note
SUMMARY_TARGETS = 1024  # targets listed in a summary (those not completed first)
SUMMARY_REASON = 200  # characters of a listed target's reason
UNREACHABLE = "node unreachable"


class DistributionTimeoutError(BlobmeshError, TimeoutError):
    """``wait_for_completion`` ran out of time; ``status`` is where things stood."""

    def __init__(self, message: str, status: DistributionStatus) -> None:
        super().__init__(message, handle=status.handle)
        self.status = status


class UnknownDistributionError(BlobmeshError, KeyError):
    """No distribution with this handle is known here."""

    def __str__(self) -> str:
        return self.message


# --- what the service needs from the space -------------------------------------------------


class PeerView(Protocol):
    @property
    def node_id(self) -> NodeId: ...

    @property
    def groups(self) -> frozenset[str]: ...

    @property
    def capabilities(self) -> Mapping[str, Any]: ...


class OpView(Protocol):
    @property
    def author(self) -> NodeId: ...

    @property
    def kind(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


class OpSubscription(Protocol):
    """A subscription to stored ops that can be resumed from its :attr:`cursor`."""

    cursor: int

    def __aiter__(self) -> AsyncIterator[OpView]: ...

    def close(self) -> None: ...


class SpaceLike(Protocol):
    """The subset of :class:`blobmesh.space.Space` distribution uses."""

    @property
    def node_id(self) -> NodeId: ...

    def members(self) -> Sequence[PeerView]:
        """Live, admitted peers (not tombstoned), including this node."""

    async def publish(self, kind: str, payload: bytes) -> object: ...

    def stored_ops(self, kind: str) -> Sequence[OpView]: ...

    def watch_ops(self, kinds: Sequence[str], *, after: int | None = None) -> OpSubscription:
        """Ops of ``kinds`` as they are stored (after the cursor ``after`` first)."""

    async def send_notify(self, peer: NodeId, data: bytes) -> None: ...

    def notify_handler(self, prefix: bytes,
                       handler: Callable[[NodeId, bytes], None] | None) -> None: ...

    def register_op_kind(self, kind: str, validator: Callable[[Any], None]) -> None: ...


# --- op payloads -----------------------------------------------------------------------------


class RequestOp(msgspec.Struct, frozen=True):
    handle: str
    blob: bytes
    size: int
    piece_size: int
    scope: str
    priority: int
    source: bytes
    created: float
    share_urls: list[str] = []
    total_size: int = 0  # a collection: bytes of the whole tree (0: just ``size``)
    plan: bytes = b""  # a collection: its plan (``distribution.collection``; export read here)


class SummaryTarget(msgspec.Struct, frozen=True, array_like=True):
    node: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    state: str
    bytes_done: Annotated[int, msgspec.Meta(ge=0)]
    reason: Annotated[str, msgspec.Meta(max_length=SUMMARY_REASON)] = ""


class SummaryOp(msgspec.Struct, frozen=True):
    """The outcome of a finished distribution, published by its source: the counts, and the
    targets themselves up to :data:`SUMMARY_TARGETS` (all of them in all but huge scopes)."""

    handle: str
    state: str
    total: Annotated[int, msgspec.Meta(ge=0)]
    completed: Annotated[int, msgspec.Meta(ge=0)]
    failed: Annotated[int, msgspec.Meta(ge=0)]
    finished: float
    targets: Annotated[list[SummaryTarget], msgspec.Meta(max_length=SUMMARY_TARGETS)] = []

    def __post_init__(self) -> None:
        if self.completed + self.failed > self.total or len(self.targets) > self.total:
            raise ValueError("summary counts do not add up")
        for t in self.targets:
            if not TargetState(t.state).final:
                raise ValueError(f"summary lists a target in a non-final state {t.state!r}")


class CancelOp(msgspec.Struct, frozen=True):
    handle: str


class QueryNote(msgspec.Struct, frozen=True, array_like=True):
    handle: str


class ProgressNote(msgspec.Struct, frozen=True, array_like=True):
    handle: str
    state: str
    bytes_done: int
    rate: float
    peers: int = 0  # swarm peers the target is connected to (absent from older nodes)
    reason: str = ""  # why it is in that state (absent from older nodes)
    # node ids of the peers it receives from (absent from older nodes); a longer list or a
    # malformed id makes the whole note malformed
    sources: Annotated[list[Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]],
                       msgspec.Meta(max_length=SOURCES_REPORTED)] = []
    # bytes/s received from each of ``sources`` (absent from older nodes); a list of another
    # length than ``sources``, or a negative rate, makes the whole note malformed
    source_rates: Annotated[list[Annotated[float, msgspec.Meta(ge=0, le=1e18)]],
                            msgspec.Meta(max_length=SOURCES_REPORTED)] = []

    def __post_init__(self) -> None:
        if self.source_rates and len(self.source_rates) != len(self.sources):
            raise ValueError("source_rates does not match sources")


_enc = msgspec.msgpack.Encoder()


_P = TypeVar("_P", bound=msgspec.Struct)


def _payload_validator(payload_type: type[_P],
                       authorize: Callable[[NodeId, _P], None] | None = None
                       ) -> Callable[[OpView], None]:
    """Reject (before storing or gossiping) an op whose payload does not decode, or that the
    authorization rules (:mod:`blobmesh.distribution.authz`) refuse."""

    def validate(op: OpView) -> None:
        try:
            payload = msgspec.msgpack.decode(op.payload, type=payload_type)
        except msgspec.DecodeError as exc:
            raise InvalidOpError(f"malformed {op.kind} payload: {exc}") from exc
        if authorize is not None:
            authorize(op.author, payload)

    return validate


@dataclass
class _Tracked:
    """A distribution as its distributor (or any observer) sees it."""

    request: RequestOp
    handle: DistributionHandle
    blob_id: BlobId
    scope: Scope
    priority: Priority
    targets: dict[NodeId, TargetStatus] = field(default_factory=dict)
    cancelled: bool = False
    gave_up: str = ""  # why no target can complete any more (final failure)
    finished: float | None = None
    asked: dict[NodeId, float] = field(default_factory=dict)  # source: when it queried whom
    summarized: tuple[int, int, int] | None = None  # (total, completed, failed) of a summary
    resolved: float = -1e9  # source: when its scope was last resolved (monotonic)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    version: int = 0
    export: str = ""

    async def next_change(self) -> None:
        """Wait until the next update of this distribution."""
        await self.changed.wait()


ShareLoader = Callable[[BlobId, Sequence[str]], Awaitable[None]]
"""Loads a blob into the local store from external share URLs (see ``blobmesh.shares``)."""


@dataclass(slots=True)
class DistributionConfig:
    progress_interval: float = PROGRESS_INTERVAL  # between one target's progress notes
    source_notes_per_s: float = SOURCE_NOTES_PER_S  # ... stretched: all targets send this many
    resolve_interval: float = 1.0  # how often scopes are re-resolved (late joiners)
    query_after: float = QUERY_AFTER  # the source asks a target silent this long (at least)
    retry_backoff: float = 1.0
    retry_backoff_max: float = 15.0
    unreachable_after: float = 10.0  # seconds of silence before a lost target is reported
    share_loader: ShareLoader | None = None
    planner: Planner | None = None  # turns a collection into a plan at the source
    plan_fetcher: PlanFetcher | None = None  # fetches what a plan names at a target
    distributors: frozenset[NodeId] | None = None  # if set, only they may publish requests


class DistributionService:
    """Distribute blobs to scopes of nodes; track, wait for and cancel distributions."""

    def __init__(self, space: SpaceLike, swarm: SwarmEngine,
                 config: DistributionConfig | None = None) -> None:
        self.space = space
        self.swarm = swarm
        self.store = swarm.store
        self.config = config or DistributionConfig()
        self._tracked: dict[DistributionHandle, _Tracked] = {}
        self._jobs: dict[DistributionHandle, asyncio.Task[None]] = {}
        self._tasks = TaskOwner("distribution")
        self._lease = LeaseId.new("distribution")
        self._changed = asyncio.Event()  # any distribution changed (set, then replaced)
        self._watch_sub: OpSubscription | None = None
        self._watch_cursor: int | None = None  # the last op the watch handled
        self._last_notes: dict[DistributionHandle, bytes] = {}  # target: what it last noted
        space.notify_handler(NOTIFY_PROGRESS, self._on_progress_note)
        space.notify_handler(NOTIFY_QUERY, self._on_query)
        self.authz = OpAuthorizer(self.config.distributors)
        space.register_op_kind(OP_REQUEST,
                               _payload_validator(RequestOp, self.authz.authorize_request))
        space.register_op_kind(OP_SUMMARY,
                               _payload_validator(SummaryOp, self.authz.authorize_summary))
        space.register_op_kind(OP_CANCEL,
                               _payload_validator(CancelOp, self.authz.authorize_cancel))
        for op in space.stored_ops(OP_REQUEST):  # so cancels arriving before start() count
            with contextlib.suppress(msgspec.DecodeError, InvalidOpError):
                self.authz.authorize_request(
                    op.author, msgspec.msgpack.decode(op.payload, type=RequestOp))

    @property
    def node_id(self) -> NodeId:
        return self.space.node_id

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        # subscribed before the stored ops are read, so no op falls between the two (ops
        # stored meanwhile are seen twice: handling an op is idempotent)
        self._watch_sub = self.space.watch_ops(WATCHED)
        self._watch_cursor = self._watch_sub.cursor
        for op in self.space.stored_ops(OP_REQUEST):
            self._on_op(op)
        for kind in (OP_SUMMARY, OP_CANCEL):
            for op in self.space.stored_ops(kind):
                self._on_op(op)
        for tracked in self._tracked.values():
            # before any note is taken: a note from one target must not look like the end of
            # a distribution whose other targets this (restarted) source has not listed yet
            if not tracked.cancelled and NodeId(tracked.request.source) == self.node_id:
                self._refresh_targets(tracked)
        self._tasks.spawn_restarting(self._watch, name="watch")
        self._tasks.spawn_restarting(self._reconcile, name="reconcile")

    def _spawn(self, coro: Coroutine[object, object, None], name: str = "op") -> None:
        if self._tasks.closing:
            coro.close()
        else:
            self._tasks.spawn(coro, name=name)

    async def aclose(self) -> None:
        await self._tasks.aclose()  # the receive jobs too
        self._jobs.clear()

    # --- the API ---------------------------------------------------------------------------

    async def distribute(self, blob_id: BlobId, scope: Scope | str,
                         priority: Priority | str = Priority.NORMAL, *,
                         share_urls: Sequence[str] = (), export: str = "",
                         export_force: bool = False) -> DistributionHandle:
        """Start distributing a blob held here to every node in ``scope``.

        A collection goes with all its members; with ``export`` every target materialises
        the tree in that directory when complete.  Raises :class:`BlobNotFoundError` if the
        blob is not complete here, and :class:`ScopeError` if the scope is malformed or names
        no reachable node.
        """
        scope = Scope.parse(scope) if isinstance(scope, str) else scope
        priority = Priority.parse(priority) if isinstance(priority, str) else priority
        if not await self.store.aio.has(blob_id):
            raise BlobNotFoundError(f"blob {blob_id} is not (completely) in this node's store",
                                    blob_id=blob_id)
        targets = self._resolve(scope)
        if not targets:
            raise ScopeError(self._empty_scope_message(scope), scope=str(scope))
        await self._verify_source_copy(blob_id)
        info = await self.store.aio.info(blob_id)
        handle = DistributionHandle.new()
        await self.store.aio.pin(blob_id, f"dist/{handle}")
        try:
            plan = await self.config.planner(blob_id, f"dist/{handle}", export, export_force) \
                if self.config.planner else None
        except BaseException:
            await self.store.aio.unpin(f"dist/{handle}")
            raise
        request = RequestOp(str(handle), blob_id.digest, info.size, info.piece_size, str(scope),
                            int(priority), self.node_id.digest, time.time(), list(share_urls),
                            plan.total_size if plan else 0, plan.payload if plan else b"")
        self.swarm.set_priority(blob_id, priority)
        tracked = self._track(request)
        for node in targets:
            tracked.targets.setdefault(node, TargetStatus(node))
        await self.space.publish(OP_REQUEST, _enc.encode(request))
        return handle

    async def _verify_source_copy(self, blob_id: BlobId) -> None:
        """Check the blob before anyone is sent it (a full rehash unless it verified recently,
        ``SwarmConfig.reverify_after``); a corrupt copy is quarantined."""
        try:
            await self.store.aio.verify(blob_id, self._lease,
                                        max_age=self.swarm.config.reverify_after)
        except CorruptBlobError as exc:
            log.error("refusing to distribute %s: %s; quarantined", blob_id.short(), exc)
            with contextlib.suppress(StoreError):
                await asyncio.to_thread(self.store.quarantine, blob_id)
            raise CorruptBlobError(f"blob {blob_id} is corrupt in this node's store "
                                   f"(quarantined; add it again): {exc}",
                                   blob_id=blob_id) from exc

    async def status(self, handle: DistributionHandle) -> DistributionStatus:
        return self._snapshot(self._get(handle))

    def handles(self) -> list[DistributionHandle]:
        """The handle of every distribution known here, without computing any status (a
        status costs a pass over its targets)."""
        return list(self._tracked)

    def distributions(self) -> list[DistributionStatus]:
        """Every distribution known here, newest first."""
        snaps = [self._snapshot(t) for t in self._tracked.values()]
        return sorted(snaps, key=lambda s: s.started, reverse=True)

    async def cancel(self, handle: DistributionHandle) -> DistributionStatus:
        """Stop pending and in-flight transfers; completed targets keep their copy.

        Only the source may cancel (raises :class:`NotAuthorizedError` elsewhere): its cancel
        op is what every node, and every restart, honours.
        """
        tracked = self._get(handle)
        source = NodeId(tracked.request.source)
        if source != self.node_id:
            raise NotAuthorizedError(f"only the source of {handle} ({source}) can cancel it; "
                                     "run cancel on that node", handle=str(handle))
        if not tracked.cancelled:
            await self.space.publish(OP_CANCEL, _enc.encode(CancelOp(str(handle))))
            await self._apply_cancel(tracked)
        return self._snapshot(tracked)

    async def wait_for_completion(self, handle: DistributionHandle, timeout: float | None
                                  ) -> DistributionStatus:
        """Wait until every target is completed, failed or cancelled.

        Raises :class:`DistributionTimeoutError` (carrying the status) after ``timeout``.
        """
        tracked = self._get(handle)

        async def until_done() -> None:
            while not self._snapshot(tracked).done:
                await tracked.next_change()

        try:
            await asyncio.wait_for(until_done(), timeout)
        except TimeoutError:
            status = self._snapshot(tracked)
            raise DistributionTimeoutError(
                f"distribution {handle} not finished after {timeout}s: {status.completed}/"
                f"{status.total} targets completed", status) from None
        return self._snapshot(tracked)

    async def next_change(self) -> None:
        """Wait until any distribution known here changes (a target's progress, say)."""
        await self._changed.wait()

    async def subscribe_progress(self, handle: DistributionHandle, *, interval: float = 0.1
                                 ) -> AsyncIterator[DistributionStatus]:
        """Status snapshots as they change (at most one per ``interval``), ending when done."""
        tracked = self._get(handle)
        seen = -1
        while True:
            while tracked.version == seen:
                await tracked.next_change()
            seen = tracked.version
            snap = self._snapshot(tracked)
            yield snap
            if snap.done:
                return
            await asyncio.sleep(interval)

    # --- scope resolution ------------------------------------------------------------------

    def _resolve(self, scope: Scope) -> list[NodeId]:
        me = self.node_id
        return [p.node_id for p in self.space.members()
                if p.node_id != me and scope.matches(p.node_id, tuple(p.groups), p.capabilities)]

    def _empty_scope_message(self, scope: Scope) -> str:
        if scope.nodes:
            known = {p.node_id for p in self.space.members()}
            unknown = [str(n) for n in scope.nodes if n not in known]
            if unknown:
                return f"scope names node(s) this node does not know: {', '.join(unknown)}"
        return f"no node other than this one matches scope {scope}"

    # --- ops and notifications -------------------------------------------------------------

    def _track(self, request: RequestOp) -> _Tracked:
        handle = DistributionHandle(request.handle)
        tracked = self._tracked.get(handle)
        if tracked is None:
            tracked = _Tracked(request, handle, BlobId(request.blob), Scope.parse(request.scope),
                               Priority(request.priority), export=plan_export(request.plan))
            self._tracked[handle] = tracked
        return tracked

    def _on_op(self, op: OpView) -> None:
        try:
            if op.kind == OP_REQUEST:
                request = msgspec.msgpack.decode(op.payload, type=RequestOp)
                self.authz.authorize_request(op.author, request)
                self._track(request)
            elif op.kind == OP_SUMMARY:
                summary = msgspec.msgpack.decode(op.payload, type=SummaryOp)
                tracked = self._tracked.get(DistributionHandle(summary.handle))
                if tracked is not None and NodeId(tracked.request.source) == op.author:
                    self._apply_summary(tracked, summary)
            elif op.kind == OP_CANCEL:
                cancel = msgspec.msgpack.decode(op.payload, type=CancelOp)
                tracked = self._tracked.get(DistributionHandle(cancel.handle))
                if tracked is not None and NodeId(tracked.request.source) == op.author:
                    self._spawn(self._apply_cancel(tracked))
        except (msgspec.DecodeError, ValueError, BlobmeshError) as exc:
            log.warning("ignoring malformed %s op from %s: %s", op.kind, op.author.short(), exc)

    def _apply_summary(self, tracked: _Tracked, summary: SummaryOp) -> None:
        """The final states a summary lists (a restarted source, or any other node, learns
        the outcome from it; the targets it does not list the source asks again)."""
        tracked.summarized = (summary.total, summary.completed, summary.failed)
        for t in summary.targets:
            node = NodeId(t.node)
            if node != self.node_id:  # this node knows its own state better
                self._set_target(tracked, node, TargetState(t.state), t.bytes_done, 0.0,
                                 t.reason)

    def _on_query(self, sender: NodeId, data: bytes) -> None:
        """The source asks where this target stands: the last note again, if any."""
        try:
            handle = DistributionHandle(msgspec.msgpack.decode(data, type=QueryNote).handle)
        except (msgspec.DecodeError, ValueError):
            return
        tracked = self._tracked.get(handle)
        note = self._last_notes.get(handle)
        if tracked is not None and note is not None and \
                NodeId(tracked.request.source) == sender:
            self._send_note(sender, note)

    def _on_progress_note(self, sender: NodeId, data: bytes) -> None:
        try:
            note = msgspec.msgpack.decode(data, type=ProgressNote)
            tracked = self._tracked.get(DistributionHandle(note.handle))
            state = TargetState(note.state)
        except (msgspec.DecodeError, ValueError):
            return
        if tracked is not None:
            current = tracked.targets.get(sender)
            if current is None and NodeId(tracked.request.source) == self.node_id:
                # a target the scope gained since the last resolve, or a node outside the
                # scope; resolving costs O(members), so at most once per resolve_interval
                # whatever a sender outside the scope sends (a new target missed here is
                # asked later)
                if time.monotonic() - tracked.resolved >= self.config.resolve_interval:
                    self._refresh_targets(tracked)
                if sender not in tracked.targets:
                    return
            if current is not None and current.state.final:
                return  # a late progress note never undoes a final state
            self._set_target(tracked, sender, state, note.bytes_done, note.rate, note.reason,
                             note.peers, tuple(NodeId(s) for s in note.sources),
                             tuple(note.source_rates))

    def _set_target(self, tracked: _Tracked, node: NodeId, state: TargetState, bytes_done: int,
                    rate: float, reason: str, peers: int = 0,
                    sources: tuple[NodeId, ...] = (),
                    source_rates: tuple[float, ...] = ()) -> None:
        old = tracked.targets.get(node, TargetStatus(node))
        if old.state is TargetState.COMPLETED and state is not TargetState.COMPLETED:
            return  # completed is final: nothing rolls it back
        if (tracked.cancelled or tracked.gave_up) and not state.final:
            return
        if not old.state.final:
            # notes and status ops travel different paths: an older count arriving after a
            # newer one must not make progress go backwards (pieces are durable once counted)
            bytes_done = max(bytes_done, old.bytes_done)
        tracked.targets[node] = replace(old, state=state, bytes_done=bytes_done, rate=rate,
                                        reason=reason, peers=peers, sources=sources,
                                        source_rates=source_rates, updated=time.time())
        self._bump(tracked)

    def _bump(self, tracked: _Tracked) -> None:
        tracked.version += 1
        snap = self._snapshot(tracked)
        if snap.done and tracked.finished is None:
            tracked.finished = time.time()
        elif not snap.done:
            tracked.finished = None  # a target came back: the distribution is active again
        counts = (snap.total, snap.completed, snap.failed)
        if snap.done and not tracked.cancelled and tracked.summarized != counts and \
                NodeId(tracked.request.source) == self.node_id:
            tracked.summarized = counts
            self._spawn(self._publish_summary(snap), name="summary")
        changed, tracked.changed = tracked.changed, asyncio.Event()
        changed.set()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _publish_summary(self, snap: DistributionStatus) -> None:
        """One op per finished distribution, whatever its number of targets."""
        listed = sorted(snap.targets, key=lambda t: t.state is TargetState.COMPLETED)
        payload = SummaryOp(str(snap.handle), str(snap.state), snap.total, snap.completed,
                            snap.failed, snap.finished or time.time(),
                            [SummaryTarget(t.node.digest, str(t.state), t.bytes_done,
                                           t.reason[:SUMMARY_REASON])
                             for t in listed[:SUMMARY_TARGETS]])
        try:
            await self.space.publish(OP_SUMMARY, _enc.encode(payload))
        except BlobmeshError as exc:
            log.warning("could not publish the summary of %s: %s", snap.handle, exc)

    async def _apply_cancel(self, tracked: _Tracked) -> None:
        if tracked.cancelled:
            return
        tracked.cancelled = True
        job = self._jobs.pop(tracked.handle, None)
        if job is not None:
            job.cancel()
            with contextlib.suppress(BaseException):
                await job
        for node, t in list(tracked.targets.items()):
            if not t.state.final:
                tracked.targets[node] = replace(t, state=TargetState.CANCELLED, rate=0.0,
                                                source_rates=(), reason="cancelled",
                                                updated=time.time())
        is_source = NodeId(tracked.request.source) == self.node_id
        if is_source or not await self.store.aio.has(tracked.blob_id):
            # the source's copy is the user's again; a target's partial copy may be collected
            # (a target that completed keeps its pinned copy: nothing is rolled back)
            with contextlib.suppress(StoreError):
                await self.store.aio.unpin(f"dist/{tracked.handle}")
        self._bump(tracked)

    def _snapshot(self, tracked: _Tracked) -> DistributionStatus:
        targets = tuple(sorted(tracked.targets.values(), key=lambda t: str(t.node)))
        if tracked.cancelled:
            state = DistributionState.CANCELLED
        elif targets and all(t.state.final for t in targets):
            state = DistributionState.COMPLETED if all(
                t.state is TargetState.COMPLETED for t in targets) else \
                DistributionState.FINISHED_WITH_FAILURES
        else:
            state = DistributionState.ACTIVE
        r = tracked.request
        return DistributionStatus(tracked.handle, tracked.blob_id, r.total_size or r.size,
                                  tracked.scope,
                                  tracked.priority, state, targets, r.created,
                                  tracked.finished if state is not DistributionState.ACTIVE
                                  else None, tracked.export)

    def _get(self, handle: DistributionHandle) -> _Tracked:
        tracked = self._tracked.get(handle)
        if tracked is None:
            raise UnknownDistributionError(f"unknown distribution {handle}", handle=str(handle))
        return tracked

    # --- background work -------------------------------------------------------------------

    async def _watch(self) -> None:
        """Handle ops as they arrive; restarted (after an overflow, say) it resumes from
        the last op handled, so ops stored in the gap are replayed, not lost."""
        sub = self._watch_sub
        if sub is None:
            sub = self._watch_sub = self.space.watch_ops(WATCHED, after=self._watch_cursor)
        try:
            async for op in sub:
                self._on_op(op)
                self._start_jobs()
                self._watch_cursor = sub.cursor
        finally:
            sub.close()
            self._watch_sub = None

    async def _reconcile(self) -> None:
        """Re-resolve scopes: new matching peers become targets; this node joins if in scope."""
        while True:
            budget = int(self.config.source_notes_per_s * self.config.resolve_interval)
            for tracked in self._tracked.values():
                if tracked.cancelled:
                    continue
                if NodeId(tracked.request.source) == self.node_id:
                    self._refresh_targets(tracked)
                    budget -= self._query_silent(tracked, budget)
            self._start_jobs()
            await asyncio.sleep(self.config.resolve_interval)

    def _query_silent(self, tracked: _Tracked, budget: int) -> int:
        """Ask targets not heard from for a while where they stand (a lost note, a restart of
        this source); returns how many were asked (at most ``budget``)."""
        c = self.config
        open_targets = [n for n, t in tracked.targets.items() if not t.state.final]
        if not open_targets or budget <= 0:
            return 0
        now = time.time()
        silent_for = query_after(len(tracked.targets), c.progress_interval,
                                 c.source_notes_per_s, c.query_after)
        heard = {n: t.updated for n, t in tracked.targets.items()}
        asked = targets_to_query(heard, tracked.asked, open_targets, now, silent_for, budget)
        data = NOTIFY_QUERY + _enc.encode(QueryNote(str(tracked.handle)))
        for node in asked:
            tracked.asked[node] = now
            self._send_note(node, data)
        return len(asked)

    def _refresh_targets(self, tracked: _Tracked) -> None:
        """Add nodes that entered the scope; mark unreachable ones (they resume on return)."""
        tracked.resolved = time.monotonic()
        in_scope = self._resolve(tracked.scope)
        changed = False
        for node in in_scope:
            if node not in tracked.targets:
                tracked.targets[node] = TargetStatus(node)
                changed = True
        alive = set(in_scope)
        silent_since = time.time() - self.config.unreachable_after
        for node, t in list(tracked.targets.items()):
            # failure detection can flap on a saturated link: only a target that is both
            # missing from the space and silent for a while is reported unreachable; it is
            # stalled, not failed: it resumes from its verified pieces when it returns
            if not t.state.final and node not in alive and t.updated < silent_since and \
                    t.reason != UNREACHABLE:
                tracked.targets[node] = replace(t, state=TargetState.STALLED, rate=0.0,
                                                reason=UNREACHABLE, updated=time.time())
                changed = True
        corrupt = self.swarm.corrupt.get(tracked.blob_id)
        if corrupt and not tracked.gave_up and not self.store.has(tracked.blob_id) and \
                not any(t.state is TargetState.COMPLETED for t in tracked.targets.values()):
            # our copy rotted and nobody else holds the blob: nothing can finish any more
            tracked.gave_up = f"the source's copy is corrupt (quarantined): {corrupt}"
            for node, t in list(tracked.targets.items()):
                if not t.state.final:
                    tracked.targets[node] = replace(t, state=TargetState.FAILED, rate=0.0,
                                                    reason=tracked.gave_up, updated=time.time())
            changed = True
        if changed:
            self._bump(tracked)

    def _me_in_scope(self, scope: Scope) -> bool:
        me = next((p for p in self.space.members() if p.node_id == self.node_id), None)
        if me is None:
            return scope.matches(self.node_id, (), {})
        return scope.matches(me.node_id, tuple(me.groups), me.capabilities)

    def _start_jobs(self) -> None:
        if self._tasks.closing:
            return
        for handle, tracked in self._tracked.items():
            if tracked.cancelled or handle in self._jobs:
                continue
            if NodeId(tracked.request.source) == self.node_id:
                continue
            if not self._me_in_scope(tracked.scope):
                continue
            self._jobs[handle] = self._tasks.spawn(self._receive(tracked),
                                                   name=f"receive-{handle}")

    async def _receive(self, tracked: _Tracked) -> None:
        """This node is a target: get the blob, reporting progress, retrying while active."""
        r = tracked.request
        source = NodeId(r.source)
        handle = tracked.handle
        pin = f"dist/{handle}"
        # (in a large scope nothing is noted at once: see NoteSchedule)
        notes = NoteSchedule(len(self._resolve(tracked.scope)), time.monotonic(),
                             self.config.progress_interval, self.config.source_notes_per_s)
        small = not notes.stretched

        def peers() -> Iterable[NodeId]:
            others = [n for n in self._resolve(tracked.scope) if n != source]
            return [source, *others]

        bytes_done = 0

        def progress(p: JobProgress) -> None:
            nonlocal bytes_done
            bytes_done = p.bytes_done
            if notes.progress((p.state, p.reason), p.bytes_done == p.bytes_total,
                              time.monotonic()):
                self._note(source, handle, p)

        self._report(source, handle, TargetState.TRANSFERRING, 0, send=small)
        backoff = self.config.retry_backoff
        while True:
            try:
                await self._download(tracked, peers, progress, pin)
                break
            except CollectionError as exc:  # a bad manifest or export: retrying cannot help
                self._report(source, handle, TargetState.FAILED, 0, str(exc),
                             delay=notes.final_delay())
                return
            except (TransferError, StoreError) as exc:
                # not final: a distribution is a desired state, this target keeps trying
                self._report(source, handle, TargetState.RETRYING, bytes_done,
                             f"{exc}; retrying in {backoff:g}s", send=small)
                if r.share_urls and self.config.share_loader is not None:
                    # no peer could provide it: fall back on the distribution's shares
                    try:
                        await self.config.share_loader(tracked.blob_id, r.share_urls)
                    except BlobmeshError as share_exc:
                        log.warning("share fallback for %s failed: %s", handle, share_exc)
                    if await self.store.aio.has(tracked.blob_id):
                        await self.store.aio.pin(tracked.blob_id, pin)
                        break
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.retry_backoff_max)
        self._report(source, handle, TargetState.COMPLETED, r.total_size or r.size,
                     delay=notes.final_delay())

    async def _download(self, tracked: _Tracked, peers: Callable[[], Iterable[NodeId]],
                        progress: Callable[[JobProgress], None], pin: str) -> None:
        r = tracked.request
        if r.plan and self.config.plan_fetcher is not None:
            # a collection: the fetcher gets its blob, then the members its plan names
            await self.config.plan_fetcher(FetchRequest(
                tracked.blob_id, r.size, r.piece_size, r.plan, peers, tracked.priority,
                progress, pin))
            return
        await self.swarm.download(tracked.blob_id, r.size, r.piece_size, peers,
                                  tracked.priority, progress, pin=pin)

    def _note(self, to: NodeId, handle: DistributionHandle, p: JobProgress,
              send: bool = True, delay: float = 0.0) -> None:
        note = ProgressNote(str(handle), str(p.state), p.bytes_done, p.rate, p.peers, p.reason,
                            [n.digest for n in p.sources], list(p.source_rates))
        data = NOTIFY_PROGRESS + _enc.encode(note)
        self._last_notes[handle] = data  # what a query from the source is answered with
        if send:
            self._send_note(to, data, delay)

    def _send_note(self, to: NodeId, data: bytes, delay: float = 0.0) -> None:
        async def send() -> None:
            if delay > 0:
                await asyncio.sleep(delay)
            with contextlib.suppress(BlobmeshError, OSError):
                await self.space.send_notify(to, data)

        self._spawn(send())

    def _report(self, source: NodeId, handle: DistributionHandle, state: TargetState,
                bytes_done: int, reason: str = "", *, send: bool = True,
                delay: float = 0.0) -> None:
        """Tell the source (only: no op, so no node's op store grows with the number of
        targets) — after ``delay`` seconds, or not now (``send`` false: the next note
        carries it) — and this node's own view of the distribution at once.

        A note can be lost, or the source restarted: it then asks again (``_query_silent``)
        and gets this last note back.
        """
        tracked = self._tracked.get(handle)
        if tracked is not None:
            self._set_target(tracked, self.node_id, state, bytes_done, 0.0, reason)
        self._note(source, handle, JobProgress(bytes_done, 0, 0, 0, 0, 0.0, state, reason),
                   send, delay)
