"""The node daemon: one process owning a store, a transport endpoint, the space, the swarm and
the distribution service, driven through a control socket in its home."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from blobmesh import __version__
from blobmesh.distribution.service import DistributionConfig, DistributionService
from blobmesh.distribution.swarm import SwarmConfig, SwarmEngine
from blobmesh.errors import BlobmeshError
from blobmesh.hashing import BlobId
from blobmesh.node.control import ControlServer
from blobmesh.node.metrics import render_metrics
from blobmesh.shares import ShareMetrics, load_blob
from blobmesh.space.config import CapValue, Seed, SpaceConfig, Timing
from blobmesh.space.predicate import parse_capability
from blobmesh.space.space import Space, endpoint_address_book
from blobmesh.store import Store
from blobmesh.transfer import AcceptAll, ChannelId, Decision, TransferManager, Voucher
from blobmesh.transfer.messages import Selector
from blobmesh.transport import Endpoint, Identity, NodeId, Ticket, TransportConfig
from blobmesh.transport.ticket import format_address, parse_listen_address

log = logging.getLogger(__name__)

NODE_FRAME_SIZE = 264 * 1024


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


@dataclass(slots=True)
class NodeConfig:
    """Everything ``blobmesh node run`` takes."""

    home: Path
    listen: tuple[str, int] = ("127.0.0.1", 0)
    bootstrap: tuple[Ticket, ...] = ()
    groups: tuple[str, ...] = ()
    capabilities: dict[str, CapValue] = field(default_factory=dict)
    space: str = "blobmesh"
    secret: bytes | None = None
    mdns: bool = False
    timing: Timing = field(default_factory=Timing)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    # One 256 KiB piece per frame; 1 MiB frames cost ~2 MiB of buffers per connection, and
    # failure detection keeps a connection to every peer.
    transport: TransportConfig = field(
        default_factory=lambda: TransportConfig(max_frame_size=NODE_FRAME_SIZE))
    distribution: DistributionConfig = field(default_factory=DistributionConfig)

    @classmethod
    def from_cli(cls, home: Path, *, listen: str, bootstrap: list[str], groups: list[str],
                 caps: list[str], space: str, secret_file: Path | None, upload_rate: float,
                 download_rate: float, mdns: bool) -> NodeConfig:
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
        return cls(home=home, listen=parse_listen_address(listen),
                   bootstrap=tuple(Ticket.parse(t) for t in bootstrap), groups=tuple(groups),
                   capabilities=capabilities, space=space, secret=secret, mdns=mdns,
                   swarm=SwarmConfig(upload_rate=upload_rate, download_rate=download_rate))


class Node:
    """A running node.  ``async with Node(config) as node: ...``"""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = Store(config.home)
        self.identity = Identity.load_or_create(config.home)
        self._endpoint: Endpoint | None = None
        self._space: Space | None = None
        self._swarm: SwarmEngine | None = None
        self._transfer: TransferManager | None = None
        self._distribution: DistributionService | None = None
        self._control: ControlServer | None = None
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
    def distribution(self) -> DistributionService:
        assert self._distribution is not None, "node not started"
        return self._distribution

    @property
    def ticket(self) -> Ticket:
        return self.endpoint.ticket

    async def start(self) -> None:
        cfg = self.config
        try:
            self._endpoint = await Endpoint.start(self.identity, cfg.listen, config=cfg.transport)
            space_cfg = SpaceConfig(
                name=cfg.space, secret=cfg.secret, groups=cfg.groups,
                capabilities=cfg.capabilities,
                addresses=tuple(format_address(a) for a in self.endpoint.ticket.addrs),
                seeds=tuple(Seed.from_ticket(t) for t in cfg.bootstrap), mdns=cfg.mdns,
                timing=cfg.timing)
            self._space = Space(space_cfg, self.identity, self.endpoint,
                                cfg.home / "space.sqlite",
                                address_book=endpoint_address_book(
                                    self.endpoint.add_peer_addresses))
            # only members of the space get pieces or channels from this node
            self._swarm = SwarmEngine(self.store, self.endpoint, cfg.swarm,
                                      authorize=self.space.is_member)
            self._transfer = TransferManager(self.endpoint, self.store)
            self._transfer.register_voucher_type(
                MEMBER_VOUCHER, MembersOnly(self.space.is_member))
            dist_cfg = replace(cfg.distribution, share_loader=self._load_from_shares)
            self._distribution = DistributionService(self.space, self.swarm, dist_cfg)
            await self.space.start()
            await self.swarm.start()
            await self._transfer.start(resume=True)
            await self.space.join()
            await self.distribution.start()
            self._control = ControlServer(self, cfg.home / "control.sock")
            await self._control.start()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self, *, leave: bool = True) -> None:
        """Stop everything; with ``leave``, first tell the space we are going (best effort)."""
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
        self.store.close()

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def _load_from_shares(self, blob_id: BlobId, urls: Sequence[str]) -> None:
        reader = await load_blob(self.store, blob_id, urls, max_tries=2,
                                 metrics=self.share_metrics)
        reader.close()

    # --- views for the control API ---------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {"node": str(self.identity.node_id), "ticket": str(self.ticket),
                "version": __version__, "space": self.config.space,
                "groups": list(self.config.groups),
                "capabilities": dict(self.config.capabilities), "home": str(self.config.home)}

    def peers_json(self) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.space.peers(alive_only=False)]

    def metrics_text(self) -> str:
        return render_metrics(self)


def run_node_forever(config: NodeConfig) -> int:
    """Run a node until SIGINT/SIGTERM; print its ticket alone on stdout's first line."""
    from blobmesh.transport import install_uvloop, tune_malloc

    install_uvloop()
    tune_malloc()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with Node(config) as node:
            sys.stdout.write(f"{node.ticket}\n")
            sys.stdout.flush()
            await stop.wait()
        return 0

    return asyncio.run(main())
