"""The space protocol over one stream: the handshake exchange, then a link's requests.

The handshake's decisions are :mod:`~blobmesh.space.admission`'s; this moves its messages,
within ``handshake_timeout``.  A :class:`Link` is our outgoing stream to one peer after the
handshake: requests carry ids, and one reader task matches the responses to them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from blobmesh.errors import ProtocolError, TransportError
from blobmesh.space import wire
from blobmesh.space.admission import AcceptorHandshake, DialerHandshake
from blobmesh.space.config import Limits, SpaceConfig
from blobmesh.space.metrics import Metrics
from blobmesh.transport.api import Stream


async def dial_handshake(stream: Stream, hs: DialerHandshake, config: SpaceConfig,
                         metrics: Metrics) -> None:
    """Run our side of a handshake on a stream we opened; reset it if that fails.

    Raises :class:`AdmissionError` (refused, or the peer is not admitted), ``ProtocolError``,
    ``TransportError`` or ``TimeoutError``.
    """
    lim = config.limits
    try:
        async with asyncio.timeout(config.timing.handshake_timeout):
            await stream.send(wire.encode(hs.hello()))
            msg = wire.decode_handshake(await stream.recv(), lim, metrics)
            await stream.send(wire.encode(hs.on_challenge(msg)))
            hs.on_welcome(wire.decode_handshake(await stream.recv(), lim, metrics))
    except BaseException:
        stream.reset("handshake failed")
        raise


async def accept_handshake(stream: Stream, hs: AcceptorHandshake, config: SpaceConfig,
                           metrics: Metrics) -> wire.Refused | None:
    """Run the acceptor's side on a stream a peer opened; None once it proved the secret, else
    the refusal, sent and the stream closed.  Raises ``TimeoutError`` past
    ``handshake_timeout``."""
    lim = config.limits
    async with asyncio.timeout(config.timing.handshake_timeout):
        reply: wire.Challenge | wire.Welcome | wire.Refused = hs.on_hello(
            wire.decode_handshake(await stream.recv(), lim, metrics))
        if not isinstance(reply, wire.Refused):
            await stream.send(wire.encode(reply))
            reply = hs.on_auth(wire.decode_handshake(await stream.recv(), lim, metrics))
        await stream.send(wire.encode(reply))
        if not isinstance(reply, wire.Refused):
            return None
        await stream.close()
        return reply


class Link:
    """Our outgoing stream to one peer, after a successful handshake."""

    def __init__(self, stream: Stream, limits: Limits, metrics: Metrics,
                 on_lost: Callable[[Link], None]) -> None:
        self._limits = limits
        self._metrics = metrics
        self._on_lost = on_lost
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
        self._metrics.inc("bytes_sent", len(raw))
        self._metrics.inc("messages_sent")
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
                self._metrics.inc("bytes_sent", len(raw))
                self._metrics.inc("messages_sent")
                return await fut
        finally:
            self._waiting.pop(rid, None)

    async def read_loop(self) -> None:
        try:
            while True:
                raw = await self.stream.recv()
                self._metrics.inc("bytes_received", len(raw))
                msg = wire.decode_response(raw, self._limits, self._metrics)
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
        self._on_lost(self)

    def close(self) -> None:
        self.closed = True
        self.stream.reset("link closed")
        if self.reader is not None:
            self.reader.cancel()
