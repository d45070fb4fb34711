"""Helpers: fast timings, many in-memory nodes, waiting for conditions."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from blobmesh.space import Limits, Metrics, Seed, Space, SpaceConfig, Timing, admission, wire
from blobmesh.space.records import sign_record
from blobmesh.transport.api import Network, Stream, StreamHandler
from blobmesh.transport.identity import Identity, NodeId
from blobmesh.transport.memory import MemoryHub, MemoryNode

FAST = Timing(gossip_interval=0.1, probe_interval=0.05, probe_timeout=0.1,
              indirect_timeout=0.15, suspicion_timeout=0.3, request_timeout=1.0,
              maintenance_interval=0.2, fetch_retry_base=0.05, unresponsive_backoff_max=0.5,
              bootstrap_interval=0.5)


class PartitionNode:
    """A MemoryNode whose streams can all be cut at once (going offline alone keeps them)."""

    def __init__(self, node: MemoryNode) -> None:
        self.inner = node
        self._streams: set[Stream] = set()

    @property
    def node_id(self) -> NodeId:
        return self.inner.node_id

    @property
    def online(self) -> bool:
        return self.inner.online

    async def open_stream(self, peer: NodeId, protocol: str) -> Stream:
        s = await self.inner.open_stream(peer, protocol)
        self._streams.add(s)
        return s

    def set_handler(self, protocol: str, handler: StreamHandler) -> None:
        async def wrapped(stream: Stream) -> None:
            self._streams.add(stream)
            await handler(stream)

        self.inner.set_handler(protocol, wrapped)

    def last_heard(self, peer: NodeId) -> float | None:
        return self.inner.last_heard(peer)

    def set_online(self, online: bool) -> None:
        self.inner.online = online
        if not online:
            for s in self._streams:
                s.reset("partitioned")
            self._streams.clear()


@dataclasses.dataclass
class Node:
    identity: Identity
    net: PartitionNode
    space: Space

    @property
    def id(self) -> NodeId:
        return self.identity.node_id


def config(**kw: Any) -> SpaceConfig:
    kw.setdefault("timing", FAST)
    kw.setdefault("limits", Limits())
    return SpaceConfig(**kw)


class Cluster:
    def __init__(self, tmp: Path, hub: MemoryHub | None = None) -> None:
        self.tmp = tmp
        self.hub = hub or MemoryHub()
        self.nodes: list[Node] = []

    async def add(self, cfg: SpaceConfig | None = None, *, seed: Node | None = None,
                  join: bool = True, kinds: tuple[str, ...] = ("test",)) -> Node:
        cfg = cfg or config()
        if seed is not None:
            cfg = dataclasses.replace(cfg, seeds=(Seed(seed.id),))
        ident = Identity.generate()
        net = PartitionNode(self.hub.node(ident.node_id))
        space = Space(cfg, ident, net, self.tmp / f"n{len(self.nodes)}.sqlite")
        for k in kinds:
            space.register_op_kind(k)
        await space.start()
        node = Node(ident, net, space)
        self.nodes.append(node)
        if join:
            await space.join()
        return node

    async def aclose(self) -> None:
        for n in self.nodes:
            await n.space.aclose()
            await n.net.inner.aclose()


@contextlib.asynccontextmanager
async def cluster(tmp: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp)
    try:
        yield c
    finally:
        await c.aclose()


def full_view(c: Cluster, nodes: list[Node] | None = None) -> bool:
    nodes = nodes if nodes is not None else c.nodes
    ids = {n.id for n in nodes}
    return all({p.node_id for p in n.space.peers()} == ids - {n.id} for n in nodes)



class RawPeer:
    """A hand-driven client of the space protocol, for feeding a node hostile input."""

    def __init__(self, hub: MemoryHub | None, cfg: SpaceConfig, *,
                 network: Network | None = None, identity: Identity | None = None) -> None:
        """On ``hub`` with a new identity, or on any ``network`` (e.g. a TLS endpoint) of
        ``identity``."""
        self.identity = identity or Identity.generate()
        if network is None:
            assert hub is not None
            network = hub.node(self.identity.node_id)
        self.node = network
        self.cfg = cfg
        self.stream: Stream | None = None

    async def connect(self, target: NodeId) -> wire.Handshake:
        """Handshake with ``target``; returns its last handshake message."""
        me = self.identity.node_id
        s = self.stream = await self.node.open_stream(target, wire.PROTOCOL)
        nonce = b"n" * admission.NONCE_SIZE
        await s.send(wire.encode(wire.Hello(self.cfg.name, wire.VERSION, nonce)))
        msg = wire.decode_handshake(await s.recv(), Limits(), Metrics())
        if not isinstance(msg, wire.Challenge):
            return msg
        proof = admission.proof(self.cfg, b"dialer", me, target, nonce, msg.nonce)
        await s.send(wire.encode(wire.Auth(proof)))
        return wire.decode_handshake(await s.recv(), Limits(), Metrics())

    async def join(self) -> None:
        """Push our own signed record: we become a member, so our ops count."""
        now = int(time.time() * 1000)
        rec = sign_record(self.identity, space=self.cfg.name, addresses=[], groups=[],
                          capabilities={}, created_at=now, expires_at=now + 600_000)
        assert isinstance(await self.request(wire.PushRecords(0, [rec], False)), wire.Ack)

    async def request(self, msg: wire.Request) -> wire.Response:
        assert self.stream is not None
        await self.stream.send(wire.encode(msg))
        return wire.decode_response(await self.stream.recv(), Limits(), Metrics())
