"""The asyncio layer of a space: links to peers, the loops that drive the state machines.

Protocol decisions live in the sans-I/O modules (:mod:`~blobmesh.space.gossip`,
:mod:`~blobmesh.space.swim`, :mod:`~blobmesh.space.fetch`, :mod:`~blobmesh.space.records`);
this module moves their messages over :class:`~blobmesh.transport.api.Network` streams.

Each node keeps at most one outgoing *link* (stream) per peer: it performs the admission
handshake once, then carries requests matched to responses by request id.  Requests from a peer
arrive on the peer's own link to us, served with bounded concurrency per link (further reads
wait, so the transport's window pushes back on the sender) and per-peer token buckets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from blobmesh.errors import (
    AdmissionError,
    InvalidIdError,
    InvalidOpError,
    InvalidRecordError,
    ProtocolError,
    SpaceError,
    SpaceLimitError,
    TransportError,
)
from blobmesh.logutil import RateLimitedLog
from blobmesh.space import admission, wire
from blobmesh.space.config import CapValue, Seed, SpaceConfig
from blobmesh.space.fetch import FetchQueue
from blobmesh.space.gossip import (
    ApplyRecords,
    GossipInitiator,
    GossipResponder,
    OfferOps,
    SendRecords,
    WantOps,
)
from blobmesh.space.metrics import Metrics
from blobmesh.space.predicate import Predicate, parse_predicate
from blobmesh.space.ratelimit import TokenBucket
from blobmesh.space.records import (
    Op,
    PeerRecord,
    check_kind,
    decode_op,
    decode_record,
    peek_op_id,
    peek_record,
    sign_op,
    sign_record,
)
from blobmesh.space.signer import Signer
from blobmesh.space.store import (
    LocalAgentStore,
    OpStore,
    PeerMeta,
    PeerMetaStore,
    PeerStore,
    PutResult,
    open_db,
)
from blobmesh.space.swim import Alive, FailureDetector, Probe, ProbeVia, Unresponsive
from blobmesh.tasks import TaskOwner
from blobmesh.transport.api import Network, Stream
from blobmesh.transport.identity import NodeId
from blobmesh.transport.ticket import Address, parse_address

log = logging.getLogger(__name__)

OpValidator = Callable[[Op], None]
"""Raises (any exception, ideally :class:`InvalidOpError`) to reject an op of its kind."""
NotifyHandler = Callable[[NodeId, bytes], Awaitable[None] | None]
"""Called with (sender, data after the handler's prefix) per notification; may be a plain
function or a coroutine one."""
AddressBook = Callable[[NodeId, tuple[str, ...]], None]
"""Tells the transport where a node listens (called for seeds and every accepted record)."""
CapabilityFilter = str | Predicate | Callable[[Mapping[str, CapValue]], bool]

_MAX_INBOUND_STREAMS_PER_PEER = 4


def endpoint_address_book(add: Callable[[NodeId, list[Address]], None]) -> AddressBook:
    """Adapt ``Endpoint.add_peer_addresses`` into an :data:`AddressBook` (bad ones skipped)."""
    def book(node: NodeId, addresses: tuple[str, ...]) -> None:
        parsed = []
        for a in addresses:
            with contextlib.suppress(InvalidIdError):
                parsed.append(parse_address(a))
        if parsed:
            add(node, parsed)

    return book


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A known peer as :meth:`Space.peers` reports it."""

    node_id: NodeId
    addresses: tuple[str, ...]
    groups: frozenset[str]
    capabilities: Mapping[str, CapValue]
    alive: bool
    last_seen: float  # wall-clock seconds of the last message from it, 0 if never
    expires_at: int   # ms since the epoch
    record: PeerRecord

    def to_json(self) -> dict[str, Any]:
        return {"node": str(self.node_id), "addresses": list(self.addresses),
                "groups": sorted(self.groups), "capabilities": dict(self.capabilities),
                "alive": self.alive, "last_seen": self.last_seen, "expires_at": self.expires_at}


class Subscription:
    """An async iterator over new ops of some kinds (or all), bounded.

    If the consumer falls more than ``subscriber_queue`` ops behind, iteration raises
    :class:`SpaceLimitError` (``limit_subscriber``) instead of silently skipping ops; read the
    gap back with :meth:`Space.ops`.
    """

    def __init__(self, space: Space, kinds: frozenset[str] | None, maxsize: int) -> None:
        self._space = space
        self.kinds = kinds
        self._queue: asyncio.Queue[Op | None] = asyncio.Queue(maxsize)
        self._overflowed = False

    def _offer(self, op: Op) -> None:
        if self._overflowed:
            return
        try:
            self._queue.put_nowait(op)
        except asyncio.QueueFull:
            self._overflowed = True
            self._space.metrics.limit("subscriber")

    def close(self) -> None:
        self._space._subs.discard(self)
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[Op]:
        return self

    async def __anext__(self) -> Op:
        if self._overflowed and self._queue.empty():
            raise SpaceLimitError("subscriber fell behind; read missed ops with Space.ops()")
        op = await self._queue.get()
        if op is None:
            raise StopAsyncIteration
        return op


class _Link:
    """Our outgoing stream to one peer, after a successful handshake."""

    def __init__(self, space: Space, stream: Stream) -> None:
        self._space = space
        self.stream = stream
        self.peer = stream.peer
        self._rid = 0
        self._waiting: dict[int, asyncio.Future[wire.Response]] = {}
        self._send_lock = asyncio.Lock()
        self.closed = False
        self.reader: asyncio.Task[None] | None = None

    async def send(self, msg: wire.Request) -> int:
        self._rid += 1
        msg.rid = self._rid
        raw = wire.encode(msg)
        async with self._send_lock:
            await self.stream.send(raw)
        self._space.metrics.inc("bytes_sent", len(raw))
        self._space.metrics.inc("messages_sent")
        return self._rid

    async def request(self, msg: wire.Request, within: float) -> wire.Response:
        fut: asyncio.Future[wire.Response] = asyncio.get_running_loop().create_future()
        self._rid += 1
        rid = self._rid
        self._waiting[rid] = fut
        try:
            async with asyncio.timeout(within):
                msg.rid = rid
                raw = wire.encode(msg)
                async with self._send_lock:
                    await self.stream.send(raw)
                self._space.metrics.inc("bytes_sent", len(raw))
                self._space.metrics.inc("messages_sent")
                return await fut
        finally:
            self._waiting.pop(rid, None)

    async def read_loop(self) -> None:
        s = self._space
        try:
            while True:
                raw = await self.stream.recv()
                s.metrics.inc("bytes_received", len(raw))
                msg = wire.decode_response(raw, s.config.limits, s.metrics)
                fut = self._waiting.get(msg.rid)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (TransportError, ProtocolError) as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(TransportError("link closed"))
            raise

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(exc)
        self._space._link_lost(self)

    def close(self) -> None:
        self.closed = True
        self.stream.reset("link closed")
        if self.reader is not None:
            self.reader.cancel()


class Space:
    """One node's membership in one space.

    Use as ``async with Space(...) as space: await space.join(); ...``.  ``clock`` returns
    wall-clock seconds (records and op timestamps); loop timing uses the event loop's clock.
    """

    def __init__(self, config: SpaceConfig, signer: Signer, network: Network,
                 db_path: Path | str, *, address_book: AddressBook | None = None,
                 on_admitted: Callable[[NodeId], None] | None = None,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None
                 ) -> None:
        if network.node_id != signer.node_id:
            raise SpaceError("the signer and the network are different nodes")
        t, lim = config.timing, config.limits
        if config.timing.op_retention / t.op_bucket_seconds + 2 > lim.max_elements:
            raise SpaceError("op_retention / op_bucket_seconds must fit in max_elements buckets")
        self.config = config
        self.node_id = signer.node_id
        self.metrics = Metrics()
        self._signer = signer
        self._net = network
        self._address_book = address_book
        self._on_admitted = on_admitted
        self._clock = clock
        self._rng = rng or random.Random()
        self._db = open_db(db_path)
        self.peer_store = PeerStore(self._db, config.name, lim, self.metrics, self._now_ms())
        self.peer_meta_store = PeerMetaStore(self._db)
        self.local_agent_store = LocalAgentStore(self._db, self.node_id)
        self.op_store = OpStore(self._db, config.name, t.op_bucket_seconds * 1000, lim,
                                self.metrics)
        self._responder = GossipResponder(self.peer_store, self.op_store, lim, self.metrics)
        self._fetch = FetchQueue(lim, retry_base=t.fetch_retry_base, retry_max=t.fetch_retry_max,
                                 metrics=self.metrics)
        self._fetch_wake = asyncio.Event()
        self._swim = FailureDetector(
            probe_interval=t.probe_interval, probe_timeout=t.probe_timeout,
            indirect_timeout=t.indirect_timeout, indirect_probes=t.indirect_probes,
            backoff_max=t.unresponsive_backoff_max, rng=self._rng)
        self._validators: dict[str, OpValidator | None] = {}
        self._subs: set[Subscription] = set()
        self._notify_handlers: dict[bytes, NotifyHandler] = {}  # by prefix
        self._links: OrderedDict[NodeId, _Link] = OrderedDict()
        self._dialing: dict[NodeId, asyncio.Lock] = {}
        self._inbound: dict[NodeId, int] = {}
        self._handshakes = 0  # inbound handshakes in progress with non-members
        # refused op id -> (do not fetch before, the author who was no member then)
        self._rejected: OrderedDict[bytes, tuple[float, NodeId | None]] = OrderedDict()
        self._warn = RateLimitedLog(log)
        self._op_rate: dict[NodeId, TokenBucket] = {}
        self._req_rate: dict[NodeId, TokenBucket] = {}
        self._seeds: dict[NodeId, Seed] = {}
        self._gossiping: set[NodeId] = set()
        self._news = False  # the last gossip interval brought new records or ops
        self._local: PeerRecord | None = None
        self._tasks = TaskOwner("space")
        self._serving: set[asyncio.Task[Any]] = set()  # inbound stream handlers
        self._closing = False
        self._lan: Any = None
        for rec in self.peer_store:
            if rec.node_id != self.node_id and not rec.tombstone:
                self._swim.add(rec.node_id)
        for seed in config.seeds:
            self.add_seed(seed)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve the space protocol and start the background loops."""
        self._net.set_handler(wire.PROTOCOL, self._serve)
        for rec in self.peer_store.query():  # vouched for when they were stored
            if rec.node_id != self.node_id:
                self._mark_admitted(rec.node_id)
        self._tasks.spawn(self._run(), name="loops")

    async def aclose(self) -> None:
        """Stop everything (without a tombstone: call :meth:`leave` first to say goodbye)."""
        if self._closing:
            return
        self._closing = True
        if self._lan is not None:
            await self._lan.aclose()
        for link in list(self._links.values()):
            link.close()
        await self._tasks.aclose()
        serving = list(self._serving)
        for task in serving:
            task.cancel()
        for task in serving:
            with contextlib.suppress(BaseException):
                await task
        for sub in list(self._subs):
            sub.close()
        self.peer_meta_store.flush()
        self._db.close()

    async def __aenter__(self) -> Space:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._every(self._gossip_period, self._gossip_tick))
            tg.create_task(self._every(lambda: self.config.timing.probe_interval / 5,
                                       self._probe_tick))
            tg.create_task(self._every(lambda: self.config.timing.maintenance_interval,
                                       self._maintain))
            tg.create_task(self._every(lambda: self.config.timing.bootstrap_interval,
                                       self._bootstrap_tick))
            tg.create_task(self._fetch_loop())

    async def _every(self, period: Callable[[], float],
                     step: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while True:
            await asyncio.sleep(period())
            try:
                await step()
            except Exception:  # a failing round must not stop the loop
                log.exception("space loop step failed")
                self.metrics.inc("loop_errors")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        if self._tasks.closing:
            coro.close()
            return
        self._tasks.spawn(coro, name=name)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _mono(self) -> float:
        return asyncio.get_running_loop().time()

    # --- membership --------------------------------------------------------------------------

    @property
    def local_record(self) -> PeerRecord | None:
        """Our current signed record (None before :meth:`join`)."""
        return self._local

    def add_seed(self, seed: Seed) -> None:
        """Contact ``seed`` (e.g. from a ticket) in the next rounds until we know peers."""
        if seed.node_id == self.node_id:
            return
        if seed.node_id not in self._seeds and len(self._seeds) >= self.config.limits.max_seeds:
            self.metrics.limit("seeds")  # e.g. a flood of spoofed LAN announcements
            return
        self._seeds[seed.node_id] = seed
        if self._address_book is not None and seed.addresses:
            self._address_book(seed.node_id, seed.addresses)

    def _sign_local(self, *, tombstone: bool) -> PeerRecord:
        c = self.config
        created = max(self._now_ms(), self.local_agent_store.last_created_at() + 1)
        raw = sign_record(self._signer, space=c.name, addresses=c.addresses, groups=c.groups,
                          capabilities=c.capabilities, created_at=created,
                          expires_at=created + int(c.timing.record_ttl * 1000),
                          tombstone=tombstone)
        rec = decode_record(raw, space=c.name, now_ms=created, limits=c.limits)
        self.local_agent_store.save(rec)
        self.peer_store.put(rec)
        self._local = rec
        return rec

    async def join(self) -> PeerRecord:
        """Sign our record, announce it to seeds, bootstrap servers and peers, pull theirs."""
        rec = self._sign_local(tombstone=False)
        await self._bootstrap_tick()  # in a closed space its records are seeds to sync with
        seeds = list(self._seeds)  # the sync moves seeds whose record arrives into the peers
        await self._sync_seeds()
        # seeds know the most peers: let them relay our record to the ones we do not know
        self._announce("records", [rec.raw], exclude=None, prefer=seeds)
        if self.config.mdns:
            from blobmesh.space.lan import LanDiscovery

            self._lan = LanDiscovery(self)
            await self._lan.start()
        return rec

    async def leave(self, grace: float = 2.0) -> None:
        """Publish a tombstone to peers and bootstrap servers, best effort within ``grace`` s."""
        if self._local is None:
            return
        rec = self._sign_local(tombstone=True)
        t = self.config.timing
        peers = self._alive_peers()[: t.publish_fanout]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await asyncio.gather(
                    self._bootstrap_put(rec.raw),
                    *(self._push("records", p, [rec.raw], relay=i < t.relay_fanout)
                      for i, p in enumerate(peers)))

    async def _sync_seeds(self) -> None:
        await asyncio.gather(*(self._gossip_with(s) for s in list(self._seeds)))

    def _alive_peers(self) -> list[NodeId]:
        """Peers worth talking to: live records, not us, not marked unresponsive."""
        out = [r.node_id for r in self.peer_store.query()
               if r.node_id != self.node_id and not self._swim.is_unresponsive(r.node_id)]
        self._rng.shuffle(out)
        return out

    def is_member(self, node: NodeId) -> bool:
        """Whether ``node`` holds a current (unexpired, not tombstoned) record in this space,
        whether or not it answers probes right now."""
        rec = self.peer_store.get(node)
        return rec is not None and not rec.tombstone and rec.expires_at > self._now_ms()

    def is_alive(self, node: NodeId) -> bool:
        rec = self.peer_store.get(node)
        return (rec is not None and not rec.tombstone and rec.expires_at > self._now_ms()
                and not self._swim.is_unresponsive(node))

    def peers(self, *, group: str | None = None, capability: CapabilityFilter | None = None,
              alive_only: bool = True, include_self: bool = False) -> list[PeerInfo]:
        """Known peers (not tombstoned), filtered by group, capability predicate and liveness.

        ``capability`` is a predicate string (``"gpu=true,mem_gb>=16"``), a parsed
        :class:`Predicate` or any callable on the capability mapping.
        """
        pred = parse_predicate(capability) if isinstance(capability, str) else capability
        now = self._now_ms()
        out = []
        for r in self.peer_store.query(group=group, capability=pred):
            if r.expires_at <= now or (r.node_id == self.node_id and not include_self):
                continue
            alive = r.node_id == self.node_id or not self._swim.is_unresponsive(r.node_id)
            if alive_only and not alive:
                continue
            meta = self.peer_meta_store.peek(r.node_id)
            out.append(PeerInfo(r.node_id, r.addresses, r.groups, r.capabilities, alive,
                                meta.last_seen if meta else 0.0, r.expires_at, r))
        return out

    def members(self) -> list[PeerInfo]:
        """Live peers including this node (what distribution scopes resolve against)."""
        return self.peers(include_self=True)

    def peer_meta(self, node: NodeId) -> PeerMeta | None:
        return self.peer_meta_store.peek(node)

    def add_records(self, raws: Iterable[bytes], sender: NodeId | None = None) -> list[PeerRecord]:
        """Verify and store signed records (from admitted peers, or injected by hand).

        A stored record makes its node a member: callers vouch for where records came from
        (records from bootstrap servers of a closed space are only hints, see
        :meth:`_hint_records`).  Invalid ones and nodes off the allowlist are counted
        (``records_rejected``) and skipped; returns those that were new or replaced an older
        record.
        """
        changed: list[PeerRecord] = []
        now = self._now_ms()
        for raw in raws:
            version = peek_record(raw, self.config.limits)
            node = _node_or_none(version[0]) if version else None
            held = self.peer_store.get(node) if node else None
            if version is not None and held is not None and held.created_at >= version[1]:
                self.metrics.inc("records_stale")  # no need to verify what we would not keep
                continue
            try:
                rec = decode_record(raw, space=self.config.name, now_ms=now,
                                    limits=self.config.limits)
            except InvalidRecordError as exc:
                self.metrics.inc("records_rejected")
                log.debug("rejected record from %s: %s", sender, exc)
                continue
            if rec.node_id == self.node_id:
                continue  # only we speak for ourselves
            if not admission.admits(self.config, rec.node_id):
                self.metrics.inc("records_rejected")
                continue
            result = self.peer_store.put(rec)
            if result in (PutResult.NEW, PutResult.REPLACED):
                changed.append(rec)
                self._record_changed(rec)
            elif result is PutResult.STALE:
                self.metrics.inc("records_stale")
        if changed:
            self._news = True
        return changed

    def _hint_records(self, raws: Iterable[bytes]) -> None:
        """Records from a bootstrap server, which anyone may write to.

        In an open space they are records like any other.  In a closed one nothing in a record
        proves its node knows the secret, so a verified record we do not hold only becomes a
        seed: its node is a member once it passes the handshake with us (or an admitted peer
        vouches for its record).
        """
        if self.config.secret is None:
            self.add_records(raws)
            return
        for raw in raws:
            try:
                rec = decode_record(raw, space=self.config.name, now_ms=self._now_ms(),
                                    limits=self.config.limits)
            except InvalidRecordError:
                self.metrics.inc("records_rejected")
                continue
            if not rec.tombstone and self.peer_store.get(rec.node_id) is None:
                self.add_seed(Seed(rec.node_id, rec.addresses))

    def _record_changed(self, rec: PeerRecord) -> None:
        if rec.tombstone:
            self.metrics.inc("peers_left")
            self._forget_peer(rec.node_id)
            return
        self._swim.add(rec.node_id)
        self._seeds.pop(rec.node_id, None)
        self._mark_admitted(rec.node_id)  # vouched for by an admitted peer
        self.op_store.set_author_gossipable(rec.node_id.digest, True)  # back, if it had left
        for op_id in [i for i, (_, author) in self._rejected.items() if author == rec.node_id]:
            del self._rejected[op_id]  # its ops count now: fetch them at the next round
        if self._address_book is not None and rec.addresses:
            self._address_book(rec.node_id, rec.addresses)

    def _forget_peer(self, node: NodeId) -> None:
        # no longer a member: its ops stay here but are not relayed any more, by any node
        self.op_store.set_author_gossipable(node.digest, False)
        self._swim.remove(node)
        self.peer_meta_store.forget([node])
        self._op_rate.pop(node, None)
        self._req_rate.pop(node, None)
        link = self._links.pop(node, None)
        if link is not None:
            link.close()

    def _announce(self, what: Literal["records", "ops"], raws: list[bytes],
                  exclude: NodeId | None, relayers: int | None = None,
                  prefer: Iterable[NodeId] = ()) -> None:
        """Push new records or ops to up to ``publish_fanout`` peers at once.

        ``relayers`` of them (default ``relay_fanout``) forward what is new to them once to
        their own peers, reaching nodes we do not know; forwarded pushes are not forwarded
        again, so an item costs about ``(1 + relay_fanout) * peers`` pushes, never a cascade.
        Peers in ``prefer`` come first, so they are the relayers.
        """
        t = self.config.timing
        n = t.relay_fanout if relayers is None else relayers
        first = set(prefer)
        alive = self._alive_peers()
        alive.sort(key=lambda p: p not in first)  # stable: the rest stays shuffled
        targets = [p for p in alive if p != exclude][: t.publish_fanout]
        if len(self._tasks) + len(targets) > self.config.limits.max_pushes:
            # a flood of relayed items must not become unbounded work; gossip delivers them
            self.metrics.limit("pushes")
            return
        for i, p in enumerate(targets):
            self._spawn(self._push(what, p, raws, relay=i < n), "push")

    async def _push(self, what: Literal["records", "ops"], peer: NodeId, raws: list[bytes],
                    relay: bool) -> bool:
        """Push in bounded chunks; False if the peer is busy or unreachable."""
        lim = self.config.limits
        budget = lim.max_message_bytes - 1024
        chunk: list[bytes] = []
        size = 0
        try:
            link = await self._link(peer)
            for raw in [*raws, b""]:
                if raw and len(chunk) < lim.max_elements and size + len(raw) <= budget:
                    chunk.append(raw)
                    size += len(raw)
                    continue
                if chunk:
                    msg: wire.Request = (wire.PushOps(0, chunk, relay) if what == "ops"
                                         else wire.PushRecords(0, chunk, relay))
                    resp = await link.request(msg, self.config.timing.request_timeout)
                    if not isinstance(resp, wire.Ack):
                        return False
                chunk, size = ([raw], len(raw)) if raw else ([], 0)
        except (TransportError, SpaceError, TimeoutError):
            return False
        return True

    # --- ops ---------------------------------------------------------------------------------

    def register_op_kind(self, kind: str, validator: OpValidator | None = None) -> None:
        """Accept ops of ``kind`` (others are rejected), checked by ``validator`` if given."""
        check_kind(kind)
        self._validators[kind] = validator

    def _validate(self, op: Op) -> None:
        if op.kind not in self._validators:
            raise InvalidOpError(f"unknown op kind {op.kind!r}")
        validator = self._validators[op.kind]
        if validator is not None:
            try:
                validator(op)
            except InvalidOpError:
                raise
            except Exception as exc:
                raise InvalidOpError(f"op {op.id.short()} rejected: {exc}") from exc
        if op.timestamp < self._now_ms() - int(self.config.timing.op_retention * 1000):
            raise InvalidOpError(f"op {op.id.short()} is older than the retention period")

    async def publish(self, kind: str, payload: bytes) -> Op:
        """Sign, validate and store a new op, then push it to peers at once.

        Raises :class:`InvalidOpError` (unknown kind, oversized, rejected by the validator) or
        :class:`SpaceLimitError` (op store full).
        """
        c = self.config
        op = sign_op(self._signer, space=c.name, kind=kind, timestamp=self._now_ms(),
                     payload=payload, limits=c.limits)
        self._validate(op)
        if not self.op_store.insert([op]):
            if self.op_store.missing([op.id.digest]):
                raise SpaceLimitError(f"op store full ({c.limits.max_ops} ops)")
            return op
        self.inform_ops_stored([op])
        self.metrics.inc("ops_published")
        self._announce("ops", [op.raw], exclude=None)
        return op

    def inform_ops_stored(self, ops: Iterable[Op]) -> None:
        """Let validated, stored ops enter gossip and reach subscribers."""
        ops = list(ops)
        self.op_store.mark_gossipable(op.id for op in ops)
        for op in ops:
            for sub in list(self._subs):
                if sub.kinds is None or op.kind in sub.kinds:
                    sub._offer(op)

    def ops(self, kind: str | None = None, since: int = 0, limit: int = 1000) -> list[Op]:
        """Stored ops (of ``kind``) with timestamp >= ``since`` (ms), oldest first."""
        return self.op_store.query(kind, since, limit)

    def stored_ops(self, kind: str) -> list[Op]:
        """Every stored op of ``kind``, oldest first (bounded by ``max_ops``)."""
        return self.op_store.query(kind, 0, self.config.limits.max_ops)

    def subscribe(self, kinds: str | Iterable[str] | None = None) -> Subscription:
        """New ops of ``kinds`` (all if None) as they are stored, local or remote.

        Call ``close()`` on the subscription when done.
        """
        wanted = None if kinds is None else frozenset([kinds] if isinstance(kinds, str)
                                                      else kinds)
        sub = Subscription(self, wanted, self.config.limits.subscriber_queue)
        self._subs.add(sub)
        return sub

    watch_ops = subscribe

    def add_ops(self, raws: Iterable[bytes], sender: NodeId | None = None) -> list[Op]:
        """Verify, validate and store signed ops; returns those that were new.

        An op counts only if its author is a current member (``ops_rejected_non_member``
        otherwise): a key that was never admitted cannot get an op stored or relayed, whoever
        pushes it.  An op a validator refused is validated once more after the batch's other
        ops are stored, since it may depend on one of them (a cancel on its request).
        """
        now = self._now_ms()
        valid: list[Op] = []
        refused: list[Op] = []
        raws = list(raws)
        ids = {raw: peek_op_id(raw, self.config.limits) for raw in raws}
        missing = set(self.op_store.missing(i.digest for i in ids.values() if i is not None))
        for raw in raws:
            op_id = ids[raw]
            if op_id is not None and op_id.digest not in missing:
                continue  # held already: no need to verify it again
            try:
                op = decode_op(raw, space=self.config.name, now_ms=now, limits=self.config.limits)
            except InvalidOpError as exc:
                self._refused(op_id.digest if op_id else None, None, exc, sender)
                continue
            if op.author != self.node_id and not self.is_member(op.author):
                self.metrics.inc("ops_rejected_non_member")
                self._refused(op.id.digest, op.author, "author is not a member", sender)
                continue
            (valid if self._valid(op) else refused).append(op)
        new = self.op_store.insert(valid)
        if new and refused:
            again = [op for op in refused if self._valid(op)]
            refused = [op for op in refused if op not in again]
            new += self.op_store.insert(again)
        for op in refused:
            self._refused(op.id.digest, None, "refused by its kind's validator", sender)
        if new:
            self.inform_ops_stored(new)
            self.metrics.inc("ops_received", len(new))
        return new

    def _valid(self, op: Op) -> bool:
        try:
            self._validate(op)
        except InvalidOpError:
            return False
        return True

    def _refused(self, op_id: bytes | None, author: NodeId | None, why: object,
                 sender: NodeId | None) -> None:
        """Count a refused op; do not fetch it again for a while (peers keep offering ops we
        refuse, e.g. by an author who left), or until ``author`` becomes a member."""
        self.metrics.inc("ops_rejected")
        log.debug("rejected op from %s: %s", sender, why)
        if op_id is None:
            return
        self._rejected[op_id] = (time.monotonic() + self.config.timing.rejected_op_ttl, author)
        self._rejected.move_to_end(op_id)
        while len(self._rejected) > self.config.limits.rejected_ops:
            self._rejected.popitem(last=False)

    def _worth_fetching(self, op_id: bytes) -> bool:
        entry = self._rejected.get(op_id)
        if entry is None:
            return True
        if entry[0] > time.monotonic():
            return False
        del self._rejected[op_id]  # retry: what it depends on may have arrived meanwhile
        return True

    # --- notify ------------------------------------------------------------------------------

    async def send_notify(self, peer: NodeId, data: bytes) -> None:
        """Send ``data`` to ``peer``; returns once handed to the transport (no delivery ack)."""
        if len(data) > self.config.limits.max_notify_bytes:
            self.metrics.limit("notify_bytes")
            raise SpaceLimitError(f"notify of {len(data)} bytes exceeds "
                                  f"{self.config.limits.max_notify_bytes}")
        link = await self._link(peer)
        await link.send(wire.Notify(0, bytes(data)))

    def notify_handler(self, prefix: bytes, handler: NotifyHandler | None) -> None:
        """Call ``handler(peer, rest)`` for each notification ``prefix + rest`` (``None``
        unregisters).  Raises ``ValueError`` for an empty prefix or one that starts, or is the
        start of, another registered prefix: each notification has one handler."""
        if handler is None:
            self._notify_handlers.pop(prefix, None)
            return
        clash = [p for p in self._notify_handlers
                 if p != prefix and (p.startswith(prefix) or prefix.startswith(p))]
        if not prefix or clash:
            raise ValueError(f"notify prefix {prefix!r} is empty or overlaps {clash}")
        self._notify_handlers[prefix] = handler

    # --- links (client side) -----------------------------------------------------------------

    async def _link(self, peer: NodeId) -> _Link:
        if self._closing:
            raise SpaceError("space is closed")
        link = self._links.get(peer)
        if link is not None and not link.closed:
            self._links.move_to_end(peer)
            return link
        lock = self._dialing.setdefault(peer, asyncio.Lock())
        try:
            async with lock:
                link = self._links.get(peer)
                if link is not None and not link.closed:
                    return link
                meta = self.peer_meta_store.peek(peer)
                if meta is not None and meta.backoff_until > self._clock():
                    raise TransportError(f"backing off from {peer.short()}", peer=peer)
                try:
                    link = await self._dial(peer)
                except (TransportError, AdmissionError, TimeoutError):
                    self._dial_failed(peer)
                    raise
                if meta is not None:
                    meta.failures, meta.backoff_until = 0, 0.0
                self._links[peer] = link
                while len(self._links) > self.config.limits.max_links:
                    _, old = self._links.popitem(last=False)
                    self.metrics.limit("links")
                    old.close()
                link.reader = self._tasks.spawn(link.read_loop(), name="link")
                return link
        finally:
            if not lock.locked():
                self._dialing.pop(peer, None)

    async def _dial(self, peer: NodeId) -> _Link:
        c = self.config
        stream = await self._net.open_stream(peer, wire.PROTOCOL)
        hs = admission.DialerHandshake(c, self.node_id, peer, os.urandom(admission.NONCE_SIZE))
        try:
            async with asyncio.timeout(c.timing.handshake_timeout):
                await stream.send(wire.encode(hs.hello()))
                msg = wire.decode_handshake(await stream.recv(), c.limits, self.metrics)
                await stream.send(wire.encode(hs.on_challenge(msg)))
                hs.on_welcome(wire.decode_handshake(await stream.recv(), c.limits,
                                                    self.metrics))
        except AdmissionError:
            self.metrics.inc("admission_refused")
            stream.reset("handshake failed")
            raise
        except BaseException:
            stream.reset("handshake failed")
            raise
        self._admitted(peer)
        return _Link(self, stream)

    def _dial_failed(self, peer: NodeId) -> None:
        """Back off exponentially from a peer (or seed) we could not reach or were refused by."""
        if peer not in self._seeds and self.peer_store.get(peer) is None:
            return  # keeps meta bounded by peers and seeds
        t = self.config.timing
        meta = self.peer_meta_store.get(peer)
        meta.failures += 1
        delay = t.probe_interval * 2 ** min(meta.failures - 1, 16)
        meta.backoff_until = self._clock() + min(t.unresponsive_backoff_max, delay)

    def _link_lost(self, link: _Link) -> None:
        if self._links.get(link.peer) is link:
            del self._links[link.peer]
        if not self._closing:
            self._swim.suspect(link.peer)

    # --- serving (server side) ---------------------------------------------------------------

    async def _serve(self, stream: Stream) -> None:
        peer = stream.peer
        if self._closing:
            stream.reset("closing")
            return
        if self._inbound.get(peer, 0) >= _MAX_INBOUND_STREAMS_PER_PEER:
            self.metrics.limit("inbound_streams")
            stream.reset("too many streams")
            return
        # strangers cost a constant, whoever they claim to be; members (vouched for, rate
        # limited) are not held up by a flood of them
        stranger = not self.is_member(peer)
        if stranger and self._handshakes >= self.config.limits.max_handshakes:
            self.metrics.limit("handshakes")
            stream.reset("busy")
            return
        self._inbound[peer] = self._inbound.get(peer, 0) + 1
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        try:
            self._handshakes += stranger
            try:
                admitted = await self._accept_handshake(stream)
            except TimeoutError:
                self.metrics.inc("handshake_timeouts")
                stream.reset("handshake timed out")
                return
            finally:
                self._handshakes -= stranger
            if admitted:
                await self._serve_requests(stream)
        except (TransportError, TimeoutError):
            stream.reset("protocol error")
        finally:
            self._serving.discard(task)
            self._inbound[peer] -= 1
            if not self._inbound[peer]:
                del self._inbound[peer]
                self._responder.drop(peer)

    async def _accept_handshake(self, stream: Stream) -> bool:
        c = self.config
        peer = stream.peer
        hs = admission.AcceptorHandshake(c, self.node_id, peer,
                                         os.urandom(admission.NONCE_SIZE))
        async with asyncio.timeout(c.timing.handshake_timeout):
            challenge = hs.on_hello(
                wire.decode_handshake(await stream.recv(), c.limits, self.metrics))
            if isinstance(challenge, wire.Refused):
                return await self._refuse(stream, challenge)
            await stream.send(wire.encode(challenge))
            welcome = hs.on_auth(
                wire.decode_handshake(await stream.recv(), c.limits, self.metrics))
            if isinstance(welcome, wire.Refused):
                return await self._refuse(stream, welcome)
            await stream.send(wire.encode(welcome))
        self._admitted(peer)
        return True

    async def _refuse(self, stream: Stream, refusal: wire.Refused) -> bool:
        self.metrics.inc("admission_refused")
        self._warn.warning("refused", "refused %s: %s", stream.peer.short(), refusal.reason)
        await stream.send(wire.encode(refusal))
        await stream.close()
        return False

    def _admitted(self, peer: NodeId) -> None:
        """``peer`` proved the secret (either direction): the transport may keep it."""
        self.metrics.inc("admission_accepted")
        self._mark_admitted(peer)

    def _mark_admitted(self, peer: NodeId) -> None:
        if self._on_admitted is not None:
            self._on_admitted(peer)

    async def _serve_requests(self, stream: Stream) -> None:
        lim, peer = self.config.limits, stream.peer
        slots = asyncio.Semaphore(lim.max_inbound_per_link)
        send_lock = asyncio.Lock()
        bucket = self._req_rate.setdefault(
            peer, TokenBucket(lim.requests_per_second, lim.requests_burst, self._mono()))

        async def reply(msg: wire.Request) -> None:
            try:
                resp = await self._handle(peer, msg)
                if resp is not None:
                    raw = wire.encode(resp)
                    async with send_lock:
                        await stream.send(raw)
                    self.metrics.inc("bytes_sent", len(raw))
                    self.metrics.inc("messages_sent")
            except TransportError:
                stream.reset("reply failed")
            finally:
                slots.release()

        async with asyncio.TaskGroup() as tg:
            while True:
                try:
                    raw = await stream.recv()
                    self.metrics.inc("bytes_received", len(raw))
                    msg = wire.decode_request(raw, lim, self.metrics)
                except ProtocolError as exc:
                    stream.reset(str(exc))
                    return
                except TransportError:
                    return  # includes StreamClosedError: the peer closed its link
                self._heard_from(peer)
                wait = bucket.take(1, self._mono())
                if wait:
                    self.metrics.limit("peer_request_rate")
                    await asyncio.sleep(wait)  # stop reading: the transport pushes back
                await slots.acquire()
                tg.create_task(reply(msg))

    def _heard_from(self, peer: NodeId) -> None:
        rec = self.peer_store.get(peer)
        if rec is None or rec.tombstone:
            return  # keeps meta bounded by the live peer store
        meta = self.peer_meta_store.get(peer)
        meta.last_seen = self._clock()
        for eff in self._swim.heard_from(peer):
            self._apply_swim(eff)

    async def _handle(self, peer: NodeId, msg: wire.Request) -> wire.Response | None:
        t, lim = self.config.timing, self.config.limits
        match msg:
            case wire.Ping():
                return wire.Ack(msg.rid)
            case wire.PingReq():
                try:
                    target = NodeId(msg.target)
                except ValueError:
                    return wire.Error(msg.rid, "malformed node id")
                # the asker waits indirect_timeout; most of it may go to connecting
                ok = target != peer and await self._ping(target, t.indirect_timeout * 0.8)
                return wire.Ack(msg.rid) if ok else wire.Nack(msg.rid)
            case wire.PushRecords():
                changed = self.add_records(msg.records, sender=peer)
                if changed and msg.relay:
                    self._announce("records", [r.raw for r in changed], exclude=peer,
                                   relayers=0)
                return wire.Ack(msg.rid)
            case wire.PushOps():
                bucket = self._op_rate.setdefault(
                    peer, TokenBucket(lim.ops_per_second, lim.ops_burst, self._mono()))
                wait = bucket.take(len(msg.ops), self._mono())
                if wait:
                    self.metrics.limit("peer_op_rate")
                    return wire.Busy(msg.rid, int(wait * 1000) + 1)
                new = self.add_ops(msg.ops, sender=peer)
                if new and msg.relay:
                    self._announce("ops", [op.raw for op in new], exclude=peer, relayers=0)
                return wire.Ack(msg.rid)
            case wire.Fetch():
                found = self.op_store.get_raw(msg.ids)
                out: list[bytes] = []
                budget = lim.max_message_bytes - 1024
                for op_id in msg.ids:
                    raw = found.get(op_id)
                    if raw is not None and budget >= len(raw):
                        out.append(raw)
                        budget -= len(raw)
                # ids that did not fit are neither sent nor "missing": the fetcher retries them
                missing = [i for i in msg.ids if i not in found]
                return wire.Ops(msg.rid, out, missing)
            case wire.Notify():
                await self._on_notify(peer, msg.data)
                return None
            case wire.GossipHello() | wire.PeerSummary() | wire.OpSummary() | wire.OpIdsReq():
                return self._responder.handle(peer, msg, self._mono())
        raise AssertionError(msg)  # pragma: no cover - the union is exhaustive

    async def _on_notify(self, peer: NodeId, data: bytes) -> None:
        if len(data) > self.config.limits.max_notify_bytes:
            self.metrics.limit("notify_bytes")
            return
        found = next(((p, h) for p, h in self._notify_handlers.items() if data.startswith(p)),
                     None)
        if found is None:
            self.metrics.inc("notify_unhandled")
            return
        self.metrics.inc("notify_received")
        prefix, handler = found
        try:
            result = handler(peer, data[len(prefix):])
            if result is not None:
                await result
        except Exception:
            log.exception("notify handler failed")

    # --- gossip ------------------------------------------------------------------------------

    def _gossip_period(self) -> float:
        """Jittered interval; a quarter of it while rounds bring news (converging)."""
        period = self.config.timing.gossip_interval * self._rng.uniform(0.75, 1.25)
        news, self._news = self._news, False
        return period / 4 if news else period

    async def _gossip_tick(self) -> None:
        if self._local is not None and self._local.tombstone:
            return  # we left
        peers = self._alive_peers()[: self.config.timing.gossip_fanout]
        if not peers or len(self.peer_store) <= 1:
            peers = [*peers, *self._seeds]
        await asyncio.gather(*(self._gossip_with(p) for p in peers))

    async def _gossip_with(self, peer: NodeId) -> None:
        """One anti-entropy round with ``peer``; failures only cost this round."""
        if peer in self._gossiping:
            return  # a new session would replace the running one at the peer
        self._gossiping.add(peer)
        t = self.config.timing
        init = GossipInitiator(self.peer_store, self.op_store, os.urandom(16), self.config.limits)
        req: wire.Request | None = init.start()
        self.metrics.inc("gossip_rounds")
        try:
            link = await self._link(peer)
            while req is not None:
                resp = await link.request(req, t.request_timeout)
                # both directions of the round, counted once (by us): its cost on the wire
                self.metrics.inc("gossip_bytes", len(wire.encode(req)) + len(wire.encode(resp)))
                if isinstance(resp, wire.Busy | wire.Error):
                    self.metrics.inc("gossip_refused")
                    return
                req, effects = init.on_response(resp)
                for eff in effects:
                    await self._apply_gossip(peer, eff)
        except AdmissionError as exc:
            if peer in self._seeds:  # e.g. bootstrapped with a ticket that has no secret
                self._warn.warning("seed-refused", "%s; join with the ticket the space's "
                                   "nodes print (it carries the secret)", exc)
            else:
                self._warn.info("gossip-refused", "gossip with %s: %s", peer.short(), exc)
        except (TransportError, SpaceError, TimeoutError):
            self.metrics.inc("gossip_failures")
        finally:
            self._gossiping.discard(peer)

    async def _apply_gossip(self, peer: NodeId,
                            eff: ApplyRecords | SendRecords | WantOps | OfferOps) -> None:
        match eff:
            case ApplyRecords():
                self.add_records(eff.records, sender=peer)
            case SendRecords():
                nodes = [n for n in map(_node_or_none, eff.nodes) if n is not None]
                raws = [r.raw for n in nodes if (r := self.peer_store.get(n)) is not None]
                if raws:
                    await self._push("records", peer, raws, relay=False)
            case WantOps():
                wanted = [i for i in eff.ids if self._worth_fetching(i)]
                if wanted:
                    self._news = True
                    self._fetch.add(wanted, peer)
                    self._fetch_wake.set()
            case OfferOps():
                raws = list(self.op_store.get_raw(eff.ids).values())
                await self._push("ops", peer, raws, relay=False)

    # --- fetch -------------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.timing.fetch_retry_base):
                    await self._fetch_wake.wait()
            self._fetch_wake.clear()
            for peer, ids in self._fetch.due(self._mono()):
                self._spawn(self._fetch_from(peer, ids), "fetch")

    async def _fetch_from(self, peer: NodeId, ids: list[bytes]) -> None:
        try:
            link = await self._link(peer)
            resp = await link.request(wire.Fetch(0, ids), self.config.timing.request_timeout)
        except (TransportError, SpaceError, TimeoutError):
            self._fetch.failed(peer, ids, self._mono())
            return
        if not isinstance(resp, wire.Ops):
            self._fetch.failed(peer, ids, self._mono())
            return
        sent = {i.digest for raw in resp.ops if (i := peek_op_id(raw, self.config.limits))}
        self.add_ops(resp.ops, sender=peer)
        requested = set(ids)
        missing = {i for i in resp.missing if i in requested}
        # what the peer sent is done with, stored or rejected by validation (then no other
        # peer's copy of that id would pass either); what did not fit its reply is asked again
        self._fetch.received(peer, [i for i in ids if i in sent])
        if missing:
            self._fetch.not_found(peer, sorted(missing))
        later = [i for i in ids if i not in sent and i not in missing]
        if later:
            self._fetch.release(peer, later)
        self._fetch_wake.set()

    # --- failure detection -------------------------------------------------------------------

    async def _probe_tick(self) -> None:
        for eff in self._swim.tick(self._mono()):
            self._apply_swim(eff)

    def _apply_swim(self, eff: Probe | ProbeVia | Unresponsive | Alive) -> None:
        match eff:
            case Probe():
                if eff.target not in self._links:
                    self._swim.set_deadline(eff.target, eff.seq,
                                            self._mono() + self.config.timing.request_timeout)
                self._spawn(self._probe(eff.target, eff.seq, (eff.target,), direct=True), "probe")
            case ProbeVia():
                self._spawn(self._probe(eff.target, eff.seq, eff.via, direct=False), "probe")
            case Unresponsive():
                self.metrics.inc("peers_unresponsive")
                meta = self.peer_meta_store.get(eff.target)
                meta.unresponsive = True
                link = self._links.pop(eff.target, None)
                if link is not None:
                    link.close()
            case Alive():
                meta = self.peer_meta_store.get(eff.target)
                meta.unresponsive = False
                meta.failures = 0

    async def _probe(self, target: NodeId, seq: int, via: tuple[NodeId, ...],
                     direct: bool) -> None:
        t = self.config.timing
        if self._recently_heard(target):
            # traffic on the connection already proves life; a ping could queue for
            # seconds behind bulk data on a saturated link and time out for nothing
            for eff in self._swim.on_ack(target, seq):
                self._apply_swim(eff)
            return
        if direct:
            try:
                await self._link(target)
            except (TransportError, SpaceError, TimeoutError):
                self._swim.set_deadline(target, seq, self._mono())  # go indirect now
                return
            self._swim.set_deadline(target, seq, self._mono() + t.probe_timeout)
            acked = await self._ping(target, t.probe_timeout)
        else:
            async def ask(helper: NodeId) -> bool:
                try:
                    link = await self._link(helper)
                    resp = await link.request(wire.PingReq(0, target.digest), t.indirect_timeout)
                except (TransportError, SpaceError, TimeoutError):
                    return False
                return isinstance(resp, wire.Ack)

            acked = any(await asyncio.gather(*(ask(h) for h in via)))
        if acked:
            for eff in self._swim.on_ack(target, seq):
                self._apply_swim(eff)

    def _recently_heard(self, target: NodeId) -> bool:
        when = self._net.last_heard(target)
        t = self.config.timing
        return when is not None and self._mono() - when < t.probe_timeout + t.indirect_timeout

    async def _ping(self, target: NodeId, within: float) -> bool:
        try:
            async with asyncio.timeout(within):
                link = await self._link(target)
                resp = await link.request(wire.Ping(0), within)
        except (TransportError, SpaceError, TimeoutError):
            return False
        ok = isinstance(resp, wire.Ack)
        if ok:
            self._heard_from(target)
        return ok

    # --- maintenance & bootstrap -------------------------------------------------------------

    async def _maintain(self) -> None:
        t = self.config.timing
        now = self._now_ms()
        for node in self.peer_store.expire(now):
            self._forget_peer(node)
        self.peer_meta_store.retain(
            lambda n: n in self._seeds or self.peer_store.get(n) is not None)
        for buckets in (self._op_rate, self._req_rate):
            for n in [n for n in buckets
                      if n not in self._inbound and self.peer_store.get(n) is None]:
                del buckets[n]
        self.op_store.prune(now - int(t.op_retention * 1000))
        self.peer_meta_store.flush()
        local = self._local
        if local is not None and not local.tombstone:
            margin = (local.expires_at - local.created_at) * t.republish_margin
            if now >= local.created_at + margin:
                rec = self._sign_local(tombstone=False)
                self.metrics.inc("records_republished")
                self._announce("records", [rec.raw], exclude=None)
                await self._bootstrap_put(rec.raw)

    async def _bootstrap_tick(self) -> None:
        if not self.config.bootstrap_urls:
            return
        from blobmesh.space.bootstrap import BootstrapClient

        for url in self.config.bootstrap_urls:
            client = BootstrapClient(url, self.config.limits)
            try:
                if self._local is not None:
                    await client.put(self.config.name, self._local.raw)
                self._hint_records(await client.sample(self.config.name))
            except SpaceError as exc:
                self.metrics.inc("bootstrap_failures")
                log.info("bootstrap %s: %s", url, exc)

    async def _bootstrap_put(self, raw: bytes) -> None:
        from blobmesh.space.bootstrap import BootstrapClient

        for url in self.config.bootstrap_urls:
            try:
                await BootstrapClient(url, self.config.limits).put(self.config.name, raw)
            except SpaceError:
                self.metrics.inc("bootstrap_failures")


def _node_or_none(raw: bytes) -> NodeId | None:
    try:
        return NodeId(raw)
    except ValueError:
        return None
