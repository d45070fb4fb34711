"""A hostile swarm peer for tests and the swarm benchmark: real protocol, bad behaviour."""

from __future__ import annotations

import asyncio

from blobmesh.distribution.model import Priority
from blobmesh.distribution.peerwire import PROTOCOL, PieceWanted, SwarmSession, peek_hello
from blobmesh.hashing import BlobId
from blobmesh.store import Bitfield
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
