"""Fixtures: in-process endpoints, and peers running in their own process."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from blobmesh.errors import StreamClosedError
from blobmesh.transport import Endpoint, Identity, Stream, Ticket, TransportConfig

PEER_SCRIPT = Path(__file__).with_name("peer.py")

FAST = TransportConfig(dial_timeout=2.0, keepalive_interval=1.0, keepalive_timeout=3.0)


@dataclass
class Peer:
    """A peer process (see ``peer.py``)."""

    proc: asyncio.subprocess.Process
    ticket: Ticket


async def spawn_peer(*args: str) -> Peer:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(PEER_SCRIPT), *args, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    return Peer(proc, Ticket.parse(line.decode()))


async def stop_peer(peer: Peer) -> None:
    if peer.proc.returncode is None:
        peer.proc.terminate()
    try:
        await asyncio.wait_for(peer.proc.wait(), 5)
    except TimeoutError:
        peer.proc.kill()
        await peer.proc.wait()


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    p = await spawn_peer()
    yield p
    await stop_peer(p)


EndpointFactory = Callable[..., Awaitable[Endpoint]]


@pytest.fixture
async def endpoints() -> AsyncIterator[EndpointFactory]:
    """Start endpoints (closed at teardown): ``await endpoints(config=..., handlers=...)``."""
    started: list[Endpoint] = []

    async def start(config: TransportConfig = FAST,
                    handlers: dict[str, Callable[[Stream], Awaitable[None]]] | None = None,
                    ) -> Endpoint:
        ep = await Endpoint.start(Identity.generate(), config=config)
        for name, handler in (handlers or {}).items():
            ep.set_handler(name, handler)
        started.append(ep)
        return ep

    yield start
    for ep in started:
        await ep.aclose()


async def echo(stream: Stream) -> None:
    while True:
        try:
            message = await stream.recv()
        except StreamClosedError:
            return
        await stream.send(message)


async def recv_all(stream: Stream) -> list[bytes]:
    """Every message until the peer closes."""
    out = []
    while True:
        try:
            out.append(await stream.recv())
        except StreamClosedError:
            return out
