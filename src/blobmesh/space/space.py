"""The space's façade: the public API, and the asyncio layer that executes the cores' actions.

Decisions live in the sans-I/O cores (:mod:`~blobmesh.space.membership`,
:mod:`~blobmesh.space.dissemination`, :mod:`~blobmesh.space.links`,
:mod:`~blobmesh.space.admission`, :mod:`~blobmesh.space.gossip`); their timers run on one
:class:`~blobmesh.space.driver.Driver`.  This module carries out what they decide (probes,
gossip rounds, fetches, pushes) over :class:`~blobmesh.transport.api.Network` streams.

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
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from blobmesh.errors import (
    AdmissionError,
    InvalidIdError,
    InvalidRecordError,
    ProtocolError,
    SpaceError,
    SpaceLimitError,
    SpaceStorageError,
    TransportError,
)
from blobmesh.logutil import RateLimitedLog
from blobmesh.space import admission, wire
from blobmesh.space.config import CapValue, Seed, SpaceConfig
from blobmesh.space.dissemination import Action as DisseminationAction
from blobmesh.space.dissemination import Dissemination, FetchFrom, GossipWith
from blobmesh.space.driver import Driver
from blobmesh.space.gossip import (
    ApplyRecords,
    GossipInitiator,
    GossipResponder,
    OfferOps,
    SendRecords,
    WantOps,
)
from blobmesh.space.links import Links
from blobmesh.space.membership import Action as MembershipAction
from blobmesh.space.membership import BootstrapRound, Maintain, Membership, PeerMeta
from blobmesh.space.metrics import Metrics
from blobmesh.space.ops import OpLog, OpValidator
from blobmesh.space.predicate import Predicate, parse_predicate
from blobmesh.space.ratelimit import TokenBucket
from blobmesh.space.records import (
    Op,
    PeerRecord,
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
    PeerMetaStore,
    PeerStore,
    PutResult,
    open_db,
)
from blobmesh.space.streams import Link, accept_handshake, dial_handshake
from blobmesh.space.subscription import Subscription
from blobmesh.space.swim import Alive, Probe, ProbeVia, Unresponsive
from blobmesh.tasks import TaskOwner
from blobmesh.transport.api import Network, Stream
from blobmesh.transport.identity import NodeId
from blobmesh.transport.ticket import Address, parse_address

log = logging.getLogger(__name__)

NotifyHandler = Callable[[NodeId, bytes], Awaitable[None] | None]
"""Called with (sender, data after the handler's prefix) per notification; may be a plain
function or a coroutine one."""
AddressBook = Callable[[NodeId, tuple[str, ...]], None]
"""Tells the transport where a node listens (called for seeds and every accepted record)."""
CapabilityFilter = str | Predicate | Callable[[Mapping[str, CapValue]], bool]


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


class _View:
    """What the dissemination core reads of the space's membership."""

    def __init__(self, space: Space) -> None:
        self._s = space
        self._alive: list[NodeId] = []
        self._of: tuple[int, int] | None = None

    def alive_peers(self) -> list[NodeId]:
        # kept until a record or a peer's liveness changes: a node knowing 10,000 peers
        # gossips several times a second, and sorting them costs ~20 ms each time
        s = self._s
        of = (s.peer_store.version, s._liveness_version)
        if of != self._of:
            self._alive = [r.node_id for r in s.peer_store.query()
                           if r.node_id != s.node_id and not s._members.is_unresponsive(r.node_id)]
            self._of = of
        return self._alive

    def seed_ids(self) -> list[NodeId]:
        return list(self._s._members.seeds)

    def known_records(self) -> int:
        return len(self._s.peer_store)

    def active(self) -> bool:
        local = self._s.local_record
        return local is None or not local.tombstone


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
        self.peer_store = PeerStore(self._db, config.name, lim, self.metrics, self._now_ms(),
                                    me=self.node_id)
        self._liveness_version = 0  # changes whenever a peer is marked unresponsive or back
        self.peer_meta_store = PeerMetaStore(self._db)
        self.local_agent_store = LocalAgentStore(self._db, self.node_id)
        self.op_store = OpStore(self._db, config.name, t.op_bucket_seconds * 1000, lim,
                                self.metrics)
        self._responder = GossipResponder(self.peer_store, self.op_store, lim, self.metrics)
        # the policy: sans-I/O cores, whose timers the driver runs and whose actions we execute
        self._members = Membership(t, max_seeds=lim.max_seeds,
                                   bootstrap=bool(config.bootstrap_urls), rng=self._rng,
                                   metrics=self.metrics)
        self._dis = Dissemination(t, lim, _View(self), rng=self._rng, metrics=self.metrics)
        self._conns = Links(t, lim, self.metrics)
        self._driver: Driver[MembershipAction | DisseminationAction] = Driver(
            [self._members, self._dis], self._execute, self.metrics)
        self._ops = OpLog(config, self.op_store, self.metrics, me=self.node_id,
                          is_member=self.is_member, now_ms=self._now_ms,
                          on_refused=lambda op_id, author: self._dis.refused(
                              op_id, author, self._mono()))
        self._notify_handlers: dict[bytes, NotifyHandler] = {}  # by prefix
        self._links: dict[NodeId, Link] = {}  # in use order: self._conns
        self._dialing: dict[NodeId, asyncio.Lock] = {}
        self._warn = RateLimitedLog(log)
        self._op_rate: dict[NodeId, TokenBucket] = {}
        self._req_rate: dict[NodeId, TokenBucket] = {}
        self._local: PeerRecord | None = None
        self._tasks = TaskOwner("space")
        self._rounds: set[str] = set()  # maintenance / bootstrap rounds running
        self._serving: set[asyncio.Task[Any]] = set()  # inbound stream handlers
        self._closing = False
        self._lan: Any = None
        for rec in self.peer_store:
            if rec.node_id != self.node_id and not rec.tombstone:
                self._members.joined(rec.node_id)
        for seed in config.seeds:
            self.add_seed(seed)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve the space protocol and start the background loops."""
        self._net.set_handler(wire.PROTOCOL, self._serve)
        for rec in self.peer_store.query():  # vouched for when they were stored
            if rec.node_id != self.node_id:
                self._mark_admitted(rec.node_id)
        now = self._mono()
        self._members.start(now)
        self._dis.start(now)
        self._driver.start()

    async def aclose(self) -> None:
        """Stop everything (without a tombstone: call :meth:`leave` first to say goodbye)."""
        if self._closing:
            return
        self._closing = True
        self._driver.close()
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
        self._ops.close_subscriptions()
        try:
            self.peer_meta_store.flush()
        except SpaceStorageError as exc:  # only liveness hints: they are learnt again
            self._storage_failed(exc)
        self._db.close()

    async def __aenter__(self) -> Space:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _execute(self, action: MembershipAction | DisseminationAction) -> None:
        """Carry out what a core decided (called by the driver)."""
        match action:
            case Maintain():
                self._spawn_round("maintain", self._maintain)
            case BootstrapRound():
                self._spawn_round("bootstrap", self._bootstrap_tick)
            case GossipWith():
                self._spawn(self._gossip_with(action.peer), "gossip")
            case FetchFrom():
                self._spawn(self._fetch_from(action.peer, action.ids), "fetch")
            case _:
                self._apply_swim(action)

    def _spawn_round(self, name: str, step: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """One round of ``name`` at a time; a failing one is counted, the next one comes."""
        if name in self._rounds:
            return

        async def run() -> None:
            try:
                await step()
            except Exception:
                log.exception("space %s round failed", name)
                self.metrics.inc("loop_errors")
            finally:
                self._rounds.discard(name)

        self._rounds.add(name)
        self._spawn(run(), name)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        if self._tasks.closing:
            coro.close()
            return
        self._tasks.spawn(coro, name=name)

    def _storage_failed(self, exc: SpaceStorageError) -> None:
        self.metrics.inc("storage_errors")
        self._warn.warning("storage", "%s", exc)

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
        if seed.node_id == self.node_id or not self._members.add_seed(seed):
            return
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
        # the sync moves seeds whose record arrives into the peers
        seeds = list(self._members.seeds)
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
        pushes = self._dis.announce("records", [rec.raw], None, in_flight=0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await asyncio.gather(self._bootstrap_put(rec.raw),
                                     *(self._push(p.what, p.peer, p.raws, p.relay)
                                       for p in pushes))

    async def _sync_seeds(self) -> None:
        await asyncio.gather(*(self._gossip_with(s) for s in list(self._members.seeds)))

    def is_member(self, node: NodeId) -> bool:
        """Whether ``node`` holds a current (unexpired, not tombstoned) record in this space,
        whether or not it answers probes right now."""
        rec = self.peer_store.get(node)
        return rec is not None and not rec.tombstone and rec.expires_at > self._now_ms()

    def is_alive(self, node: NodeId) -> bool:
        rec = self.peer_store.get(node)
        return (rec is not None and not rec.tombstone and rec.expires_at > self._now_ms()
                and not self._members.is_unresponsive(node))

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
            alive = r.node_id == self.node_id or not self._members.is_unresponsive(r.node_id)
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
            self._dis.news()
            self._driver.poke()
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
        self._members.joined(rec.node_id)
        self._mark_admitted(rec.node_id)  # vouched for by an admitted peer
        self.op_store.set_author_gossipable(rec.node_id.digest, True)  # back, if it had left
        self._dis.member_joined(rec.node_id)
        if self._address_book is not None and rec.addresses:
            self._address_book(rec.node_id, rec.addresses)

    def _forget_peer(self, node: NodeId) -> None:
        # no longer a member: its ops stay here but are not relayed any more, by any node
        self.op_store.set_author_gossipable(node.digest, False)
        self._members.left(node)
        self.peer_meta_store.forget([node])
        self._op_rate.pop(node, None)
        self._req_rate.pop(node, None)
        self._drop_link(node)

    def _drop_link(self, peer: NodeId) -> None:
        link = self._links.pop(peer, None)
        self._conns.closed(peer)
        if link is not None:
            link.close()

    def _announce(self, what: Literal["records", "ops"], raws: list[bytes],
                  exclude: NodeId | None, relayers: int | None = None,
                  prefer: Iterable[NodeId] = ()) -> None:
        """Push new records or ops at once (whom to: :meth:`Dissemination.announce`)."""
        for p in self._dis.announce(what, raws, exclude, in_flight=len(self._tasks),
                                    relayers=relayers, prefer=prefer):
            self._spawn(self._push(p.what, p.peer, p.raws, p.relay), "push")

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
        self._ops.register_kind(kind, validator)

    async def publish(self, kind: str, payload: bytes) -> Op:
        """Sign, validate and store a new op, then push it to peers at once.

        Raises :class:`InvalidOpError` (unknown kind, oversized, rejected by the validator),
        :class:`SpaceLimitError` (op store full) or :class:`SpaceStorageError` (the database
        could not be written, e.g. the disk is full: the op was neither stored nor sent).
        """
        c = self.config
        op = sign_op(self._signer, space=c.name, kind=kind, timestamp=self._now_ms(),
                     payload=payload, limits=c.limits)
        if self._ops.add_own(op):
            self.metrics.inc("ops_published")
            self._announce("ops", [op.raw], exclude=None)
        return op

    def inform_ops_stored(self, ops: Iterable[Op]) -> None:
        """Let validated, stored ops enter gossip and reach subscribers."""
        self._ops.inform_stored(ops)

    def ops(self, kind: str | None = None, since: int = 0, limit: int = 1000) -> list[Op]:
        """Stored ops (of ``kind``) with timestamp >= ``since`` (ms), oldest first."""
        return self.op_store.query(kind, since, limit)

    def stored_ops(self, kind: str) -> list[Op]:
        """Every stored op of ``kind``, oldest first (bounded by ``max_ops``)."""
        return self.op_store.query(kind, 0, self.config.limits.max_ops)

    def subscribe(self, kinds: str | Iterable[str] | None = None, *,
                  after: int | None = None) -> Subscription:
        """Ops of ``kinds`` (all if None) as they are stored, local or remote: those stored
        after the cursor ``after`` (a :attr:`Subscription.cursor`) first, else only new ones.

        Call ``close()`` on the subscription when done.
        """
        return self._ops.subscribe(kinds, after)

    watch_ops = subscribe

    def add_ops(self, raws: Iterable[bytes], sender: NodeId | None = None) -> list[Op]:
        """Verify, validate and store signed ops from peers; returns those that were new
        (see :meth:`OpLog.add`).

        Raises :class:`SpaceStorageError` if the database could not be written (the ops not
        stored come back with gossip).
        """
        return self._ops.add(raws, sender)

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

    async def _link(self, peer: NodeId) -> Link:
        if self._closing:
            raise SpaceError("space is closed")
        link = self._links.get(peer)
        if link is not None and not link.closed:
            self._conns.used(peer)
            return link
        lock = self._dialing.setdefault(peer, asyncio.Lock())
        try:
            async with lock:
                link = self._links.get(peer)
                if link is not None and not link.closed:
                    return link
                meta = self.peer_meta_store.peek(peer)
                if not Links.may_dial(meta, self._clock()):
                    raise TransportError(f"backing off from {peer.short()}", peer=peer)
                try:
                    link = await self._dial(peer)
                except (TransportError, AdmissionError, TimeoutError):
                    self._dial_failed(peer)
                    raise
                Links.dial_ok(meta)
                self._links[peer] = link
                for old in self._conns.opened(peer):
                    self._drop_link(old)
                link.reader = self._tasks.spawn(link.read_loop(), name="link")
                return link
        finally:
            if not lock.locked():
                self._dialing.pop(peer, None)

    async def _dial(self, peer: NodeId) -> Link:
        c = self.config
        stream = await self._net.open_stream(peer, wire.PROTOCOL)
        hs = admission.DialerHandshake(c, self.node_id, peer, os.urandom(admission.NONCE_SIZE))
        try:
            await dial_handshake(stream, hs, c, self.metrics)
        except AdmissionError:
            self.metrics.inc("admission_refused")
            raise
        self._admitted(peer)
        return Link(stream, c.limits, self.metrics, self._link_lost)

    def _dial_failed(self, peer: NodeId) -> None:
        """Back off exponentially from a peer (or seed) we could not reach or were refused by."""
        if peer not in self._members.seeds and self.peer_store.get(peer) is None:
            return  # keeps meta bounded by peers and seeds
        self._conns.dial_failed(self.peer_meta_store.get(peer), self._clock())

    def _link_lost(self, link: Link) -> None:
        if self._links.get(link.peer) is link:
            del self._links[link.peer]
            self._conns.closed(link.peer)
        if not self._closing:
            self._members.link_lost(link.peer)
            self._driver.poke()

    # --- serving (server side) ---------------------------------------------------------------

    async def _serve(self, stream: Stream) -> None:
        peer = stream.peer
        if self._closing:
            stream.reset("closing")
            return
        stranger = not self.is_member(peer)
        refusal = self._conns.admit_stream(peer, stranger=stranger)
        if refusal is not None:
            stream.reset(refusal)
            return
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        try:
            try:
                admitted = await self._accept_handshake(stream)
            except TimeoutError:
                self.metrics.inc("handshake_timeouts")
                stream.reset("handshake timed out")
                return
            finally:
                self._conns.handshake_over(stranger=stranger)
            if admitted:
                await self._serve_requests(stream)
        except (TransportError, TimeoutError):
            stream.reset("protocol error")
        finally:
            self._serving.discard(task)
            if self._conns.stream_closed(peer):
                self._responder.drop(peer)

    async def _accept_handshake(self, stream: Stream) -> bool:
        c = self.config
        peer = stream.peer
        hs = admission.AcceptorHandshake(c, self.node_id, peer,
                                         os.urandom(admission.NONCE_SIZE))
        refusal = await accept_handshake(stream, hs, c, self.metrics)
        if refusal is not None:
            self.metrics.inc("admission_refused")
            self._warn.warning("refused", "refused %s: %s", peer.short(), refusal.reason)
            return False
        self._admitted(peer)
        return True

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
                try:
                    resp = await self._handle(peer, msg)
                except SpaceStorageError as exc:  # e.g. disk full: the peer tries again later
                    self._storage_failed(exc)
                    resp = wire.Busy(msg.rid, 1000)
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
        for eff in self._members.heard_from(peer):
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
            case (wire.GossipHello() | wire.PeerTreeReq() | wire.PeerSummary() | wire.OpSummary()
                  | wire.OpIdsReq()):
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

    async def _gossip_with(self, peer: NodeId) -> None:
        """One anti-entropy round with ``peer``; failures only cost this round."""
        if not self._dis.begin_round(peer):
            return
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
        except SpaceStorageError as exc:
            self._storage_failed(exc)
        except AdmissionError as exc:
            if peer in self._members.seeds:  # e.g. bootstrapped with a ticket that has no secret
                self._warn.warning("seed-refused", "%s; join with the ticket the space's "
                                   "nodes print (it carries the secret)", exc)
            else:
                self._warn.info("gossip-refused", "gossip with %s: %s", peer.short(), exc)
        except (TransportError, SpaceError, TimeoutError):
            self.metrics.inc("gossip_failures")
        finally:
            self._dis.round_over(peer)

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
                self._dis.want(peer, eff.ids, self._mono())
                self._driver.poke()
            case OfferOps():
                raws = list(self.op_store.get_raw(eff.ids).values())
                await self._push("ops", peer, raws, relay=False)

    # --- fetch -------------------------------------------------------------------------------

    async def _fetch_from(self, peer: NodeId, ids: list[bytes]) -> None:
        try:
            await self._fetch_once(peer, ids)
        finally:
            self._driver.poke()  # the queue changed: what is due next may have too

    async def _fetch_once(self, peer: NodeId, ids: list[bytes]) -> None:
        fetch = self._dis.fetch
        try:
            link = await self._link(peer)
            resp = await link.request(wire.Fetch(0, ids), self.config.timing.request_timeout)
        except (TransportError, SpaceError, TimeoutError):
            fetch.failed(peer, ids, self._mono())
            return
        if not isinstance(resp, wire.Ops):
            fetch.failed(peer, ids, self._mono())
            return
        sent = {i.digest for raw in resp.ops if (i := peek_op_id(raw, self.config.limits))}
        try:
            self.add_ops(resp.ops, sender=peer)
        except SpaceStorageError as exc:
            self._storage_failed(exc)
            fetch.failed(peer, ids, self._mono())
            return
        requested = set(ids)
        missing = {i for i in resp.missing if i in requested}
        # what the peer sent is done with, stored or rejected by validation (then no other
        # peer's copy of that id would pass either); what did not fit its reply is asked again
        fetch.received(peer, [i for i in ids if i in sent])
        if missing:
            fetch.not_found(peer, sorted(missing))
        later = [i for i in ids if i not in sent and i not in missing]
        if later:
            fetch.release(peer, later)

    # --- failure detection -------------------------------------------------------------------

    def _apply_swim(self, eff: Probe | ProbeVia | Unresponsive | Alive) -> None:
        match eff:
            case Probe():
                if eff.target not in self._links:  # connecting first: that is not silence
                    self._set_deadline(eff.target, eff.seq,
                                       self._mono() + self.config.timing.request_timeout)
                self._spawn(self._probe(eff.target, eff.seq, (eff.target,), within=eff.timeout),
                            "probe")
            case ProbeVia():
                self._spawn(self._probe(eff.target, eff.seq, eff.via, within=None), "probe")
            case Unresponsive():
                self._liveness_version += 1
                self.metrics.inc("peers_unresponsive")
                meta = self.peer_meta_store.get(eff.target)
                meta.unresponsive = True
                self._drop_link(eff.target)
            case Alive():
                self._liveness_version += 1
                meta = self.peer_meta_store.get(eff.target)
                meta.unresponsive = False
                meta.failures = 0

    async def _probe(self, target: NodeId, seq: int, via: tuple[NodeId, ...],
                     within: float | None) -> None:
        """A direct ping waiting ``within`` for its ack, or (None) ping-reqs through ``via``."""
        t = self.config.timing
        if self._recently_heard(target):
            # traffic on the connection already proves life; a ping could queue for
            # seconds behind bulk data on a saturated link and time out for nothing
            self._acked(target, seq)
            return
        if within is not None:
            try:
                await self._link(target)
            except (TransportError, SpaceError, TimeoutError):
                self._set_deadline(target, seq, self._mono())  # go indirect now
                return
            self._set_deadline(target, seq, self._mono() + within)
            acked = await self._ping(target, within)
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
            self._acked(target, seq)

    def _acked(self, target: NodeId, seq: int) -> None:
        for eff in self._members.acked(target, seq):
            self._apply_swim(eff)
        self._driver.poke()

    def _set_deadline(self, target: NodeId, seq: int, deadline: float) -> None:
        self._members.detector.set_deadline(target, seq, deadline)
        self._driver.poke()

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
            lambda n: n in self._members.seeds or self.peer_store.get(n) is not None)
        for buckets in (self._op_rate, self._req_rate):
            for n in [n for n in buckets
                      if not self._conns.serving(n) and self.peer_store.get(n) is None]:
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
