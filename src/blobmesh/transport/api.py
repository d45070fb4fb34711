"""What services (transfer, space, distribution) need from the transport.

Services depend only on these protocols, so their asyncio layers can be tested over the real
TLS transport and their pure state machines with no sockets at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from blobmesh.transport.identity import NodeId


class Stream(Protocol):
    """An ordered, reliable, message-oriented stream to one peer, for one protocol.

    Many streams share one connection.  ``send`` applies backpressure (it waits while the
    stream's send window is full); ``recv`` raises :class:`blobmesh.errors.StreamClosedError`
    once the peer has closed its side, and :class:`blobmesh.errors.TransportError` when the
    connection broke or the stream was reset.
    """

    @property
    def peer(self) -> NodeId: ...

    @property
    def protocol(self) -> str: ...

    async def send(self, message: bytes | memoryview, *, flush: bool = False,
                   head: bytes = b"") -> None:
        """Send one message, ``head + message``: a small ``head`` (a message's own header) goes
        in front of a large payload without copying the payload; with ``flush``, return only
        once everything sent before it was handed to the operating system, so the transport
        holds at most this message (what is sent next does not wait behind megabytes of
        earlier data) and the link does not idle while the caller prepares the next one."""

    def try_send(self, message: bytes) -> bool:
        """Send a small message now if that needs no waiting (credit, window, no send in
        progress on this stream); False: nothing was sent, ``send`` it.  Never reorders: a
        message goes after every message whose ``send`` began before."""

    async def recv(self) -> bytes: ...

    async def close(self) -> None:
        """Close our sending side (the peer's ``recv`` then raises StreamClosedError)."""

    def reset(self, reason: str = "") -> None:
        """Abort both directions at once."""


StreamHandler = Callable[[Stream], Awaitable[None]]


class Network(Protocol):
    """A node's view of the network: open streams to peers, accept streams from them."""

    @property
    def node_id(self) -> NodeId: ...

    async def open_stream(self, peer: NodeId, protocol: str) -> Stream:
        """Open a stream to ``peer`` (dialing or reusing a connection)."""

    def set_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve incoming streams of ``protocol`` with ``handler`` (one task per stream)."""

    def last_heard(self, peer: NodeId) -> float | None:
        """Event-loop time of the last data received from ``peer``; None when unknown."""
