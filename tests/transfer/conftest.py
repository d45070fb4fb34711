"""Two nodes with their own stores, joined by an in-memory hub."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blobmesh.hashing import BlobId
from blobmesh.store import LeaseId, Store
from blobmesh.transfer import AcceptAll, TransferConfig, TransferManager, batch
from blobmesh.transfer.batch import BATCH_PROTOCOL, BatchMessage
from blobmesh.transfer.messages import Data, Message, decode
from blobmesh.transport.api import Stream, StreamHandler
from blobmesh.transport.identity import NodeId
from blobmesh.transport.memory import MemoryHub, MemoryNode

PIECE = 256 * 1024


def node_id(n: int) -> NodeId:
    return NodeId(bytes([n]) * 32)


def fast_config(**kw: object) -> TransferConfig:
    base: dict[str, object] = dict(window=4 * PIECE, flush_bytes=2 * PIECE, flush_interval=0.02,
                                   stall_timeout=0.5, tick=0.05, restart_backoff=0.05,
                                   restart_backoff_max=0.2)
    base.update(kw)
    return TransferConfig(**base)  # type: ignore[arg-type]


@dataclass
class Peer:
    node: MemoryNode
    tap: Tap
    store: Store
    mgr: TransferManager

    @property
    def id(self) -> NodeId:
        return self.node.node_id


class Pair:
    """Builds peers on one hub; closes them all at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.hub = MemoryHub()
        self.peers: list[Peer] = []

    async def peer(self, n: int, config: TransferConfig | None = None,
                   validator: bool = True) -> Peer:
        node = self.hub.nodes.get(node_id(n)) or self.hub.node(node_id(n))
        node.online = True
        store = Store(self.tmp / f"home{n}")
        tap = Tap(node)
        mgr = TransferManager(tap, store, config=config or fast_config())
        if validator:
            mgr.register_voucher_type("any", AcceptAll())
        await mgr.start()
        p = Peer(node, tap, store, mgr)
        self.peers.append(p)
        return p

    async def stop(self, p: Peer) -> None:
        """Simulate the process dying: the node goes offline and its manager stops."""
        await p.node.aclose()
        await p.mgr.aclose()
        p.store.close()
        self.peers.remove(p)

    async def close(self) -> None:
        for p in list(self.peers):
            await self.stop(p)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    pr = Pair(tmp_path)
    try:
        yield pr
    finally:
        await pr.close()


@pytest.fixture
def blob_bytes() -> Iterator[bytes]:
    yield os.urandom(3 * 1024 * 1024 + 12345)


def add(store: Store, data: bytes) -> BlobId:
    return store.add_bytes(data, LeaseId.new("test")).blob_id


class TapStream:
    """A stream whose sends go through its tap's hook (to count, reset or freeze)."""

    def __init__(self, inner: Stream, tap: Tap) -> None:
        self.inner = inner
        self.tap = tap

    @property
    def peer(self) -> NodeId:
        return self.inner.peer

    @property
    def protocol(self) -> str:
        return self.inner.protocol

    async def send(self, message: bytes | memoryview, *, flush: bool = False,
                   head: bytes = b"") -> None:
        if self.protocol == BATCH_PROTOCOL:
            if self.tap.batch_hook is not None:
                await self.tap.batch_hook(self, batch.decode(head + message))
            await self.inner.send(message, flush=flush, head=head)
            return
        msg = decode(head + message)
        if isinstance(msg, Data):
            self.tap.data_sent += 1
            self.tap.pieces_sent.append(msg.piece)
        if self.tap.hook is not None:
            await self.tap.hook(self, msg)
        await self.inner.send(message, flush=flush, head=head)

    def try_send(self, message: bytes) -> bool:
        return False  # every message goes through send, and so through the hook

    async def recv(self) -> bytes:
        return await self.inner.recv()

    async def close(self) -> None:
        await self.inner.close()

    def reset(self, reason: str = "") -> None:
        self.inner.reset(reason)


Hook = Callable[[TapStream, Message], Awaitable[None]]
BatchHook = Callable[[TapStream, BatchMessage], Awaitable[None]]


class Tap:
    """A Network wrapper that sees every message its node sends."""

    def __init__(self, inner: MemoryNode) -> None:
        self.inner = inner
        self.hook: Hook | None = None
        self.batch_hook: BatchHook | None = None
        self.data_sent = 0
        self.pieces_sent: list[int] = []

    @property
    def node_id(self) -> NodeId:
        return self.inner.node_id

    async def open_stream(self, peer: NodeId, protocol: str) -> TapStream:
        return TapStream(await self.inner.open_stream(peer, protocol), self)

    def set_handler(self, protocol: str, handler: StreamHandler) -> None:
        async def wrapped(stream: Stream) -> None:
            await handler(TapStream(stream, self))

        self.inner.set_handler(protocol, wrapped)

    def last_heard(self, peer: NodeId) -> float | None:
        return self.inner.last_heard(peer)


def corrupt(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
