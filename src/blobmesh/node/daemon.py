"""The node daemon: one process owning a store, a transport endpoint, the space, the swarm and
the distribution service, driven through a control socket in its home."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from blobmesh import __version__
from blobmesh.distribution.collection import CollectionDistributor
from blobmesh.distribution.model import DistributionStatus, Scope
from blobmesh.distribution.service import DistributionConfig, DistributionService
from blobmesh.distribution.swarm import SwarmConfig, SwarmEngine
from blobmesh.errors import BlobmeshError, InvalidIdError, TransportError
from blobmesh.hashing import BlobId
from blobmesh.node.control import ControlServer, metrics_app, serve_app
from blobmesh.node.home import MAX_REMEMBERED_PEERS, HomeLock, NodeState
from blobmesh.node.logs import configure_logging
from blobmesh.node.metrics import render_metrics
from blobmesh.node.stats import STATS_ANSWER, STATS_ASK, StatsAsker, StatsResponder
from blobmesh.node.watch import PeerView, RejoinPolicy, distribution_changes, peer_changes
from blobmesh.shares import ShareMetrics, load_blob
from blobmesh.space.config import CapValue, Seed, SpaceConfig, Timing
from blobmesh.space.predicate import parse_capability
from blobmesh.space.secret import join_secret, space_of
from blobmesh.space.space import Space, endpoint_address_book
from blobmesh.store import Store
from blobmesh.store.piece_index import PieceIndex
from blobmesh.tasks import TaskOwner
from blobmesh.transfer import AcceptAll, ChannelId, Decision, TransferManager, Voucher
from blobmesh.transfer.messages import Selector
from blobmesh.transport import (
    Address,
    Endpoint,
    Identity,
    NodeId,
    Ticket,
    TransportConfig,
    parse_address,
)
from blobmesh.transport.ticket import format_address, parse_listen_address

if TYPE_CHECKING:
    from blobmesh.node.config import RunSettings

log = logging.getLogger(__name__)

_PEER_EVENTS = {"joined": "joined", "suspect": "is suspect (not answering probes)",
                "alive": "is alive (answers probes)", "left": "left",
                "dead": "is dead (record gone)"}

NODE_FRAME_SIZE = 264 * 1024
ADMISSION_TIMEOUT = 10.0
"""Seconds an accepted connection may live before its peer passes the space handshake (or is
vouched for as a member); strangers cost the transport a bounded number of such connections."""


MEMBER_VOUCHER = "blobmesh/open"
"""Voucher type of point-to-point pulls (``blobmesh get``); a node grants them to members."""


class MembersOnly(AcceptAll):
    """Grants pulls to members of the node's space, never pushes."""

    def __init__(self, is_member: Callable[[NodeId], bool]) -> None:
        super().__init__(push=False, pull=True)
        self._is_member = is_member

    def validate_pull(self, is_restart: bool, chid: ChannelId, receiver: NodeId,
                      voucher: Voucher, blob_id: BlobId, selector: Selector) -> Decision:
        if not self._is_member(receiver):
            return Decision.reject(f"{receiver.short()} is not a member of this space")
        return super().validate_pull(is_restart, chid, receiver, voucher, blob_id, selector)


class NodeConfigError(BlobmeshError):
    """A node setting is malformed (bad ticket, capability, secret file...)."""

    exit_code = 2


class NodeService(Protocol):
    """Something a node runs on top of itself (the dashboard), closed before the node."""

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class NodeConfig:
    """Everything ``blobmesh node run`` takes."""

    home: Path
    listen: tuple[str, int] = ("127.0.0.1", 0)
    bootstrap: tuple[Ticket, ...] = ()
    groups: tuple[str, ...] = ()
    capabilities: dict[str, CapValue] = field(default_factory=dict)
    space: str = "blobmesh"
    secret: bytes | None = None  # None: from a join ticket, kept in the home, or a new one
    open_space: bool = False  # no secret at all: anyone who knows the space name may join
    mdns: bool = False
    timing: Timing = field(default_factory=Timing)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    # One 256 KiB piece per frame; 1 MiB frames cost ~2 MiB of buffers per connection, and
    # failure detection keeps a connection to every peer.
    transport: TransportConfig = field(
        default_factory=lambda: TransportConfig(max_frame_size=NODE_FRAME_SIZE,
                                                admission_timeout=ADMISSION_TIMEOUT))
    distribution: DistributionConfig = field(default_factory=DistributionConfig)
    metrics_listen: Address | None = None
    """Where to serve ``/metrics`` over TCP for Prometheus (besides the control socket)."""
    want_peers: int = 8
    """While fewer peers are alive, remembered peers and bootstrap tickets are redialed."""
    watch_interval: float = 1.0
    """Seconds between looks at the space and the distributions (logs, remembered peers)."""
    http_listen: Address | None = None
    """Where the web dashboard listens (``--http-listen``; the CLI adds it as a service)."""
    services: tuple[Callable[[Node], Awaitable[NodeService]], ...] = ()
    """Opened in order once the node runs (layers above node, e.g. ``blobmesh.dashboard``)."""

    @classmethod
    def from_cli(cls, home: Path, *, listen: str, bootstrap: list[str], groups: list[str],
                 caps: list[str], space: str | None, secret_file: Path | None,
                 upload_rate: float, download_rate: float, mdns: bool,
                 open_space: bool = False, distributors: Sequence[str] = ()) -> NodeConfig:
        secret = None
        if secret_file is not None:
            try:
                secret = secret_file.read_bytes().strip()
            except OSError as exc:
                raise NodeConfigError(f"cannot read secret file {secret_file}: "
                                      f"{exc.strerror}") from exc
            if len(secret) < 16:
                raise NodeConfigError(f"secret in {secret_file} is shorter than 16 bytes")
        try:
            capabilities = dict(parse_capability(c) for c in caps)
        except ValueError as exc:
            raise NodeConfigError(str(exc)) from exc
        tickets = tuple(Ticket.parse(t) for t in bootstrap)
        return cls(home=home, listen=parse_listen_address(listen), bootstrap=tickets,
                   groups=tuple(groups), capabilities=capabilities,
                   space=space or space_of(tickets), secret=secret, open_space=open_space,
                   mdns=mdns, distribution=DistributionConfig(distributors=frozenset(
                       NodeId.parse(d) for d in distributors) if distributors else None),
                   swarm=SwarmConfig(upload_rate=upload_rate, download_rate=download_rate))


class Node:
    """A running node.  ``async with Node(config) as node: ...``

    Constructing one takes its home's lock (:class:`HomeInUseError` if another node holds
    it); :meth:`aclose` releases it."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._lock = HomeLock(config.home)
        self._lock.acquire()  # before anything in the home is opened, the control socket above all
        try:
            self._secret = join_secret(config.home, space=config.space, secret=config.secret,
                                       tickets=config.bootstrap, open_space=config.open_space)
            self.store = Store(config.home)
            self.piece_index = PieceIndex(self.store)
            self.identity = Identity.load_or_create(config.home)
        except BaseException:
            self._lock.release()
            raise
        self.state = NodeState.load(config.home)
        self._remembered_from: list[tuple[NodeId, tuple[str, ...]]] | None = None
        self.started_at = time.time()
        self._endpoint: Endpoint | None = None
        self._space: Space | None = None
        self._swarm: SwarmEngine | None = None
        self._transfer: TransferManager | None = None
        self._distribution: DistributionService | None = None
        self._control: ControlServer | None = None
        self._tasks = TaskOwner("node")
        self._http: list[web.AppRunner] = []
        self._services: list[NodeService] = []
        self.unhandled_errors = 0
        self.metrics_address: str | None = None  # host:port of the TCP /metrics, if served
        self.share_metrics = ShareMetrics()

    @property
    def endpoint(self) -> Endpoint:
        assert self._endpoint is not None, "node not started"
        return self._endpoint

    @property
    def space(self) -> Space:
        assert self._space is not None, "node not started"
        return self._space

    @property
    def swarm(self) -> SwarmEngine:
        assert self._swarm is not None, "node not started"
        return self._swarm

    @property
    def transfer(self) -> TransferManager:
        assert self._transfer is not None, "node not started"
        return self._transfer

    @property
    def distribution(self) -> DistributionService:
        assert self._distribution is not None, "node not started"
        return self._distribution

    @property
    def ticket(self) -> Ticket:
        """The join ticket: reach this node and join its space (carries the space secret)."""
        return self.endpoint.ticket.for_space(self.config.space, self._secret)

    async def start(self) -> None:
        cfg = self.config
        try:
            self._endpoint = await self._listen()
            space_cfg = SpaceConfig(
                name=cfg.space, secret=self._secret, groups=cfg.groups,
                capabilities=cfg.capabilities,
                addresses=tuple(format_address(a) for a in self.endpoint.ticket.addrs),
                seeds=tuple(Seed.from_ticket(t) for t in self._rejoin_tickets()),
                mdns=cfg.mdns, timing=cfg.timing)
            book = endpoint_address_book(self.endpoint.add_peer_addresses)
            self._space = Space(space_cfg, self.identity, self.endpoint,
                                cfg.home / "space.sqlite", address_book=book,
                                on_admitted=self.endpoint.mark_admitted)
            for peer in self.space.peers(alive_only=False):
                # records kept from earlier runs: dialable now, not only once they change
                book(peer.node_id, peer.addresses)
            # only members of the space get pieces or channels from this node
            self._swarm = SwarmEngine(self.store, self.endpoint, cfg.swarm,
                                      authorize=self.space.is_member,
                                      piece_index=self.piece_index)
            collections = CollectionDistributor(self.swarm)
            self._transfer = TransferManager(self.endpoint, self.store,
                                             admit=self.space.is_member)
            self._transfer.register_voucher_type(
                MEMBER_VOUCHER, MembersOnly(self.space.is_member))
            dist_cfg = replace(cfg.distribution, share_loader=self._load_from_shares,
                               planner=collections.plan, plan_fetcher=collections.fetch)
            self._distribution = DistributionService(self.space, self.swarm, dist_cfg)
            self.stats = StatsResponder(self.space, self.store.aio, lambda: (
                self.swarm.bytes_uploaded, self.swarm.bytes_downloaded))
            self.space.notify_handler(STATS_ASK, self.stats.on_ask)
            # other members' stats, for this node's viewers (dashboard pages, blobmesh top)
            self.member_stats = StatsAsker(self.space, self._tasks)
            self.space.notify_handler(STATS_ANSWER, self.member_stats.on_answer)
            await self.space.start()
            await self.swarm.start()
            await self._transfer.start(resume=True)
            await self.space.join()
            await self.distribution.start()
            self._control = ControlServer(self, cfg.home / "control.sock")
            await self._control.start()
            if cfg.metrics_listen is not None:
                self.metrics_address = await self.serve_http(metrics_app(self),
                                                             cfg.metrics_listen)
                log.info("metrics on http://%s/metrics", self.metrics_address)
            self._tasks.spawn_restarting(self._watch, name="watch")
            for open_service in cfg.services:
                self._services.append(await open_service(self))
            log.info("node %s listening on %s, addresses %s", self.identity.node_id,
                     format_address(self.endpoint.listen_address),
                     " ".join(format_address(a) for a in self.ticket.addrs))
            log.info("ticket %s", self.ticket)
        except BaseException:
            await self.aclose()
            raise

    async def _listen(self) -> Endpoint:
        """Listen where configured; port 0 means the port of the last run if it is free, so
        tickets handed out before a restart stay valid."""
        cfg = self.config
        host, port = cfg.listen
        endpoint = None
        if port == 0 and self.state.listen_port:
            try:
                endpoint = await Endpoint.start(self.identity, (host, self.state.listen_port),
                                                config=cfg.transport)
            except TransportError as exc:
                log.warning("the port of the last run is taken, picking another (tickets "
                            "handed out before no longer reach this node): %s", exc)
        if endpoint is None:
            endpoint = await Endpoint.start(self.identity, cfg.listen, config=cfg.transport)
        if self.state.listen_port != endpoint.listen_address[1]:
            self.state.listen_port = endpoint.listen_address[1]
            self.state.save(cfg.home)
        return endpoint

    async def serve_http(self, app: web.Application, listen: Address) -> str:
        """Serve ``app`` on TCP at ``listen`` until the node stops; returns ``host:port``.

        The node's HTTP surfaces beyond the control socket attach here: ``/metrics`` for
        Prometheus, and any other app (a dashboard) given the node."""
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:  # bound here, so port 0 works and the bound port is known
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(listen)
        except OSError as exc:
            sock.close()
            raise NodeConfigError(f"cannot listen on {format_address(listen)}: "
                                  f"{exc.strerror or exc}") from exc
        runner = serve_app(app)
        await runner.setup()
        self._http.append(runner)
        await web.SockSite(runner, sock).start()
        return format_address((listen[0], sock.getsockname()[1]))

    def _rejoin_tickets(self) -> list[Ticket]:
        """Bootstrap tickets, then the peers remembered from earlier runs (not this node)."""
        seen = {self.identity.node_id}
        out = []
        for t in [*self.config.bootstrap, *self.state.peers]:
            if t.node_id not in seen:
                seen.add(t.node_id)
                out.append(t)
        return out

    async def _watch(self) -> None:
        """Log membership and distribution changes, remember peers, redial while alone."""
        loop = asyncio.get_running_loop()
        rejoin = RejoinPolicy(self.config.want_peers, now=loop.time())
        peers: dict[NodeId, PeerView] = {}
        # what was loaded from earlier runs is history, not news
        dists = {str(s.handle): s for s in self.distribution.distributions()}
        me = self.identity.node_id
        while True:
            now_peers = self._peer_views(peers)
            for event, node in peer_changes(peers, now_peers):
                log.info("peer %s %s", node, _PEER_EVENTS[event])
            peers = now_peers
            self._remember_peers()
            now_dists = {str(s.handle): s for s in self.distribution.distributions()}
            for line in distribution_changes(dists, now_dists, me):
                log.info("%s", line)
            dists = now_dists
            rejoin.want = self.config.want_peers  # SIGHUP may change it
            if loop.time() >= rejoin.get_timer():
                tickets = self._rejoin_tickets()
                alive = sum(v.alive and not v.left for v in peers.values())
                if rejoin.handle_timer(loop.time(), alive, len(tickets)):
                    for t in tickets:
                        if not self.space.is_alive(t.node_id):
                            self.space.add_seed(Seed.from_ticket(t))
            await asyncio.sleep(self.config.watch_interval)

    def _peer_views(self, before: dict[NodeId, PeerView]) -> dict[NodeId, PeerView]:
        views = {p.node_id: PeerView(p.alive) for p in self.space.peers(alive_only=False)}
        for node in before.keys() - views.keys():
            rec = self.space.peer_store.get(node)
            if rec is not None and rec.tombstone:
                views[node] = PeerView(False, left=True)
        return views

    def _remember_peers(self) -> None:
        """Keep the tickets of live peers first, then the others remembered, bounded."""
        peers = self.space.peers()
        live = [(p.node_id, p.addresses) for p in peers]
        if live == self._remembered_from:
            return  # (most seconds: parsing and encoding every peer's ticket costs O(peers))
        self._remembered_from = live
        fresh: dict[NodeId, Ticket] = {}
        for p in peers:
            if len(fresh) >= MAX_REMEMBERED_PEERS:
                break
            addrs: list[Address] = []
            for a in p.addresses:
                with contextlib.suppress(InvalidIdError):
                    addrs.append(parse_address(a))
            if addrs:
                fresh[p.node_id] = Ticket.create(p.node_id, addrs)
        for t in self.state.peers:
            fresh.setdefault(t.node_id, t)
        merged = list(fresh.values())[:MAX_REMEMBERED_PEERS]
        if [str(t) for t in merged] != [str(t) for t in self.state.peers]:
            self.state.peers = merged
            self.state.save(self.config.home)

    async def aclose(self, *, leave: bool = True) -> None:
        """Stop everything; with ``leave``, first tell the space we are going (best effort)."""
        while self._services:
            await self._services.pop().aclose()
        await self._tasks.aclose()
        for runner in self._http:
            await runner.cleanup()
        self._http.clear()
        if self._control is not None:
            await self._control.aclose()
            self._control = None
        if self._distribution is not None:
            await self._distribution.aclose()
            self._distribution = None
        if self._space is not None:
            if leave:
                with contextlib.suppress(BlobmeshError, TimeoutError, OSError):
                    await asyncio.wait_for(self._space.leave(), 3.0)
                    log.info("left the space")
            await self._space.aclose()
            self._space = None
        if self._transfer is not None:
            await self._transfer.aclose()
            self._transfer = None
        if self._swarm is not None:
            await self._swarm.aclose()
            self._swarm = None
        if self._endpoint is not None:
            await self._endpoint.aclose()
            self._endpoint = None
        await asyncio.to_thread(self.store.close)  # waits for store calls still running
        self.piece_index.close()
        self._lock.release()

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def _load_from_shares(self, blob_id: BlobId, urls: Sequence[str]) -> None:
        reader = await load_blob(self.store, blob_id, urls, max_tries=2,
                                 metrics=self.share_metrics)
        await self.store.aio.io(reader.close)

    # --- views for the control API ---------------------------------------------------------

    async def describe(self) -> dict[str, Any]:
        """``GET /v1/node``: who this node is, where it listens, what it holds."""
        blobs = await self.store.aio.blobs()
        return {"node": str(self.identity.node_id), "ticket": str(self.ticket),
                "addresses": [format_address(a) for a in self.ticket.addrs],
                "listen": format_address(self.endpoint.listen_address),
                "version": __version__, "space": self.config.space,
                "groups": list(self.config.groups),
                "capabilities": dict(self.config.capabilities), "home": str(self.config.home),
                "pid": os.getpid(), "started_at": self.started_at,
                "uptime_seconds": time.time() - self.started_at,
                "peers_alive": len(self.space.peers()),
                "store": {"blobs": sum(b.complete for b in blobs),
                          "partial_blobs": sum(not b.complete for b in blobs),
                          "bytes": sum(b.bytes_present for b in blobs)}}

    def unhandled_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The event loop's last resort for an error no task owner retrieved: one ERROR line
        naming it, counted (``blobmesh_node_unhandled_errors_total``); the traceback at
        DEBUG, so normal logs stay readable while the bug stays visible."""
        self.unhandled_errors += 1
        exc = context.get("exception")
        where = context.get("task") or context.get("future") or ""
        name = where.get_name() if isinstance(where, asyncio.Task) else ""
        what = f"{type(exc).__name__}: {exc}" if exc is not None else ""
        log.error("unhandled error%s: %s %s", f" in {name}" if name else "",
                  context.get("message", ""), what)
        if exc is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("unhandled error details", exc_info=exc)

    def apply(self, config: NodeConfig) -> None:
        """Take what can change while running from ``config``: bootstrap tickets (dialed
        from the next rejoin round) and the number of peers wanted.  The rest needs a restart."""
        self.config = replace(self.config, bootstrap=config.bootstrap,
                              want_peers=config.want_peers)

    def distributions(self, *, active_only: bool = False,
                      with_pruned: bool = False) -> list[DistributionStatus]:
        """Distributions known here and (unless ``with_pruned``) not pruned, newest first."""
        pruned = set() if with_pruned else set(self.state.pruned)
        return [s for s in self.distribution.distributions()
                if str(s.handle) not in pruned and not (active_only and s.done)]

    def active_distribution(self, blob_id: BlobId, scope: str,
                            export: str = "") -> DistributionStatus | None:
        """The active distribution this node started for ``blob_id`` to ``scope`` with the
        same ``export``, if any (one exporting elsewhere is not the one asked for)."""
        want = str(Scope.parse(scope))
        me = self.identity.node_id
        return next((s for s in self.distribution.distributions()
                     if not s.done and s.blob_id == blob_id and str(s.scope) == want
                     and s.export == export and s.target(me) is None), None)

    def prune_distributions(self) -> list[str]:
        """Hide every finished distribution from listings; returns their handles."""
        known = {str(s.handle): s for s in self.distribution.distributions()}
        gone = [h for h, s in known.items() if s.done and h not in self.state.pruned]
        # handles the service no longer knows need no hiding: the list stays bounded
        self.state.pruned = sorted({*gone, *(h for h in self.state.pruned if h in known)})
        self.state.save(self.config.home)
        return gone

    def peers_json(self) -> list[dict[str, Any]]:
        """``GET /v1/peers``, in the CLI's JSON scheme (times in Unix seconds)."""
        return [{"node": str(p.node_id), "addresses": list(p.addresses),
                 "groups": sorted(p.groups), "capabilities": dict(p.capabilities),
                 "alive": p.alive, "last_seen_at": p.last_seen or None,
                 "expires_at": p.expires_at / 1000}
                for p in self.space.peers(alive_only=False)]

    async def metrics_text(self) -> str:
        return render_metrics(self, await self.store.aio.blobs())


def run_node_forever(settings: RunSettings,
                     reload: Callable[[], RunSettings] | None = None) -> int:
    """Run a node until SIGINT/SIGTERM (both leave the space gracefully); print its ticket
    alone on stdout's first line.  SIGHUP calls ``reload`` and applies what can change while
    running: log level and format, bootstrap tickets, the number of peers wanted."""
    from blobmesh.transport import install_uvloop, tune_malloc

    install_uvloop()
    tune_malloc()
    configure_logging(settings.log_level, settings.log_format)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with Node(settings.node) as node:
            loop.set_exception_handler(node.unhandled_error)
            if reload is not None:
                loop.add_signal_handler(signal.SIGHUP, lambda: _reload(node, reload))
            sys.stdout.write(f"{node.ticket}\n")
            sys.stdout.flush()
            await stop.wait()
            log.info("stopping: leaving the space")
        return 0

    return asyncio.run(main())


def _reload(node: Node, reload: Callable[[], RunSettings]) -> None:
    try:
        new = reload()
    except BlobmeshError as exc:
        log.warning("SIGHUP: config not reloaded: %s", exc)
        return
    configure_logging(new.log_level, new.log_format)
    node.apply(new.node)
    log.info("SIGHUP: reloaded %s (log level %s, %d bootstrap ticket(s), want %d peers)",
             new.config_file or "flags", new.log_level, len(new.node.bootstrap),
             new.node.want_peers)
