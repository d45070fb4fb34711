"""An in-process implementation of :class:`~blobmesh.transport.api.Network`.

Nodes in one event loop reach each other through a shared :class:`MemoryHub`, with the same
stream semantics as the TLS transport (ordering, backpressure, close and reset).  It is used
for deterministic tests of services and for simulations of many nodes in one process.
"""

from __future__ import annotations

import asyncio
from collections import deque

from blobmesh.errors import StreamClosedError, TransportError
from blobmesh.tasks import TaskOwner
from blobmesh.transport.api import StreamHandler
from blobmesh.transport.identity import NodeId

DEFAULT_WINDOW = 64


class MemoryStream:
    """One side of an in-memory stream pair."""

    def __init__(self, local: NodeId, peer: NodeId, protocol: str, window: int) -> None:
        self._local = local
        self._peer = peer
        self._protocol = protocol
        self._window = window
        self._inbox: deque[bytes] = deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._eof = False
        self._error: TransportError | None = None
        self._sent_closed = False
        self._sending = 0  # sends waiting for window (a try_send must not overtake them)
        self.other: MemoryStream | None = None

    @property
    def peer(self) -> NodeId:
        return self._peer

    @property
    def protocol(self) -> str:
        return self._protocol

    async def send(self, message: bytes | memoryview, *, flush: bool = False,
                   head: bytes = b"") -> None:
        # (in memory a message is delivered at once: nothing to flush)
        other = self.other
        assert other is not None
        self._sending += 1
        try:
            while True:
                if self._error is not None:
                    raise self._error
                if self._sent_closed:
                    raise TransportError("send on a closed stream")
                if len(other._inbox) < self._window:
                    break
                self._writable.clear()
                await self._writable.wait()
        finally:
            self._sending -= 1
        other._inbox.append(head + message if head else bytes(message))
        other._readable.set()
        await asyncio.sleep(0)

    def try_send(self, message: bytes) -> bool:
        other = self.other
        if self._sending or self._error is not None or self._sent_closed or other is None or \
                len(other._inbox) >= self._window:
            return False
        other._inbox.append(bytes(message))
        other._readable.set()
        return True

    async def recv(self) -> bytes:
        while not self._inbox:
            if self._error is not None:
                raise self._error
            if self._eof:
                raise StreamClosedError(f"{self._peer.short()} closed the stream")
            self._readable.clear()
            await self._readable.wait()
        msg = self._inbox.popleft()
        if self.other is not None:
            self.other._writable.set()
        return msg

    async def close(self) -> None:
        if self._sent_closed:
            return
        self._sent_closed = True
        if self.other is not None:
            self.other._eof = True
            self.other._readable.set()

    def reset(self, reason: str = "") -> None:
        err = TransportError(f"stream reset{': ' + reason if reason else ''}")
        for side in (self, self.other):
            if side is not None and side._error is None:
                side._error = err
                side._readable.set()
                side._writable.set()


class MemoryNode:
    """A node attached to a hub; implements the Network protocol."""

    def __init__(self, hub: MemoryHub, node_id: NodeId) -> None:
        self._hub = hub
        self._node_id = node_id
        self._handlers: dict[str, StreamHandler] = {}
        self._tasks = TaskOwner(f"memory-node {node_id.short()}")
        self.online = True

    @property
    def node_id(self) -> NodeId:
        return self._node_id

    def set_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._handlers[protocol] = handler

    def last_heard(self, peer: NodeId) -> float | None:
        return None  # in memory nothing queues: failure detection pings as usual

    async def open_stream(self, peer: NodeId, protocol: str) -> MemoryStream:
        remote = self._hub.nodes.get(peer)
        if not self.online:
            raise TransportError("this node is offline")
        if remote is None or not remote.online:
            raise TransportError(f"cannot reach {peer.short()}", peer=peer)
        handler = remote._handlers.get(protocol)
        if handler is None:
            raise TransportError(f"{peer.short()} does not speak {protocol}", peer=peer)
        ours = MemoryStream(self._node_id, peer, protocol, self._hub.window)
        theirs = MemoryStream(peer, self._node_id, protocol, self._hub.window)
        ours.other, theirs.other = theirs, ours
        remote._spawn(handler, theirs)
        return ours

    def _spawn(self, handler: StreamHandler, stream: MemoryStream) -> None:
        async def run() -> None:
            try:
                await handler(stream)
            except asyncio.CancelledError:
                stream.reset("handler ended")
                raise
            except TransportError:
                stream.reset("handler ended")  # the stream broke: no failure of ours
            except Exception:
                stream.reset("handler failed")  # logged and counted by the owner
                raise

        self._tasks.spawn(run(), name=f"handler {stream.protocol}")

    async def aclose(self) -> None:
        """Go offline and cancel every handler task this node runs."""
        self.online = False
        await self._tasks.aclose()


class MemoryHub:
    """The shared medium of in-memory nodes."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        self.window = window
        self.nodes: dict[NodeId, MemoryNode] = {}

    def node(self, node_id: NodeId) -> MemoryNode:
        n = MemoryNode(self, node_id)
        self.nodes[node_id] = n
        return n
