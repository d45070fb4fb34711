"""A hostile swarm peer for tests and the benchmarks: real protocol, bad behaviour.

:func:`hostile_node` runs it as a space member (the tests, in process; ``probe_trust.py`` and
``bench_swarm.py --hostile``, as a process through ``benchmarks/hostile_node.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec

from blobmesh.distribution.model import Priority
from blobmesh.distribution.peerwire import PROTOCOL, PieceWanted, SwarmSession, peek_hello
from blobmesh.distribution.service import OP_REQUEST, RequestOp
from blobmesh.errors import BlobmeshError
from blobmesh.hashing import BlobId
from blobmesh.node.daemon import Node, NodeConfig
from blobmesh.store import Bitfield
from blobmesh.tasks import TaskOwner
from blobmesh.transport.api import Network, Stream
from blobmesh.transport.identity import NodeId

MODES = ("black-hole", "non-reader")


class HostilePeer:
    """An admitted peer speaking the real swarm protocol, badly.

    ``black-hole``: claims every piece and the layer, accepts requests, never answers them.
    ``non-reader``: asks every node for every piece and then never reads a byte.
    """

    def __init__(self, network: Network, mode: str) -> None:
        self.network = network
        self.mode = mode
        self.streams: list[Stream] = []
        self.requests = 0
        network.set_handler(PROTOCOL, self._on_stream)

    def _hello(self, session: SwarmSession) -> bytes:
        have = Bitfield.full(session.pieces) if self.mode == "black-hole" \
            else Bitfield(session.pieces)
        return session.hello(have, self.mode == "black-hole", int(Priority.NORMAL))

    async def _on_stream(self, stream: Stream) -> None:
        first = await stream.recv()
        hello = peek_hello(first)
        session = SwarmSession(BlobId(hello.blob), hello.size, hello.piece_size)
        session.receive(first)
        await stream.send(self._hello(session))
        await self._misbehave(stream, session)

    async def attack(self, peer: NodeId, blob: BlobId, size: int, piece_size: int) -> None:
        stream = await self.network.open_stream(peer, PROTOCOL)
        session = SwarmSession(blob, size, piece_size)
        await stream.send(self._hello(session))
        session.receive(await stream.recv())
        await self._misbehave(stream, session)

    async def _misbehave(self, stream: Stream, session: SwarmSession) -> None:
        self.streams.append(stream)
        if self.mode == "non-reader":
            for index in range(session.pieces):
                await stream.send(session.request(index))
            await asyncio.Event().wait()  # never reads again
        while True:  # a black hole: takes every request, answers none
            if isinstance(session.receive(await stream.recv()), PieceWanted):
                self.requests += 1


@contextlib.asynccontextmanager
async def hostile_node(config: NodeConfig, mode: str) -> AsyncIterator[tuple[Node, HostilePeer]]:
    """A real node (admitted space member, control socket) that takes no part in
    distributions: a :class:`HostilePeer` serves its swarm streams instead, and a
    ``non-reader`` attacks every member for every distributed blob (as each ``dist/request``
    arrives)."""
    node = Node(config)
    await node.start()
    try:
        await node.distribution.aclose()  # no downloads of its own: only the misbehaviour
        hostile = HostilePeer(node.endpoint, mode)  # takes over the swarm protocol
        async with TaskOwner("hostile") as tasks:
            if mode == "non-reader":
                tasks.spawn(_attack_every_distribution(node, hostile, tasks), name="watch")
            yield node, hostile
    finally:
        await node.aclose(leave=False)


async def _attack_every_distribution(node: Node, hostile: HostilePeer,
                                     tasks: TaskOwner) -> None:
    async for op in node.space.watch_ops([OP_REQUEST]):
        request = msgspec.msgpack.decode(op.payload, type=RequestOp)
        blob = BlobId(request.blob)
        for member in node.space.members():
            peer: NodeId = member.node_id
            if peer != node.identity.node_id:
                tasks.spawn(_attack(hostile, peer, blob, request), name=f"attack-{peer.short()}")


async def _attack(hostile: HostilePeer, peer: NodeId, blob: BlobId, request: RequestOp) -> None:
    with contextlib.suppress(BlobmeshError):  # it is refused, reset and banned: as it should
        await hostile.attack(peer, blob, request.size, request.piece_size)
