"""The I/O threads (transport/io.py) under load: one TLS connection carrying gigabytes both
ways at once, every byte checked, and few threads however many connections."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from blobmesh.errors import StreamClosedError
from blobmesh.transport import TransportConfig, io
from tests.transport.conftest import EndpointFactory, echo, spawn_peer, stop_peer
from tests.transport.peer import PATTERN_CHUNK, pattern
from tests.util import eventually

GiB = 1024 * 1024 * 1024


async def test_gigabytes_both_ways_on_one_connection(endpoints: EndpointFactory) -> None:
    """1 GiB up and 1 GiB down at once over one connection, every byte verified at the
    receiver: the one thread owning the TLS socket both encrypts and decrypts."""
    p = await spawn_peer()
    try:
        a = await endpoints(TransportConfig())
        node = a.add_ticket(p.ticket)
        up = await a.open_stream(node, "pattern-sink")
        down = await a.open_stream(node, "pattern-source")
        await up.send(b"7")
        await down.send(f"{GiB} 11".encode())

        async def upload() -> bytes:
            for i in range(GiB // PATTERN_CHUNK):
                await up.send(pattern(7, i))
            await up.close()
            return await up.recv()

        async def download() -> int:
            index = 0
            while True:
                try:
                    message = await down.recv()
                except StreamClosedError:
                    return index * PATTERN_CHUNK
                assert message == pattern(11, index), f"message {index} corrupted"
                index += 1

        started = time.monotonic()
        verdict, got = await asyncio.wait_for(asyncio.gather(upload(), download()), 120)
        elapsed = time.monotonic() - started
        assert verdict == f"ok {GiB}".encode()
        assert got == GiB
        assert len(a._all) == 1
        print(f"2 x 1 GiB both ways in {elapsed:.1f}s")
    finally:
        await stop_peer(p)


async def test_threads_do_not_grow_with_connections(endpoints: EndpointFactory) -> None:
    before = threading.active_count()
    hub = await endpoints(TransportConfig(io_threads=2), handlers={"echo": echo})
    others = [await endpoints() for _ in range(8)]
    for ep in others:
        s = await ep.open_stream(ep.add_ticket(hub.ticket), "echo")
        await s.send(b"x")
        assert await s.recv() == b"x"
    assert len(hub._all) == 8
    io = [t for t in threading.enumerate() if t.name.startswith("blobmesh-io")]
    # 2 for the hub, and one each for the others (only one connection each so far)
    assert len(io) <= 2 + len(others)
    assert threading.active_count() - before <= 2 + len(others) + 2  # + asyncio helpers


async def test_closed_connections_are_forgotten(endpoints: EndpointFactory) -> None:
    hub = await endpoints(handlers={"echo": echo})
    for _ in range(3):
        ep = await endpoints()
        s = await ep.open_stream(ep.add_ticket(hub.ticket), "echo")
        await s.send(b"x")
        await s.recv()
        await ep.aclose()
    # the I/O thread drops a channel when it next services it, after the owner forgot it
    await eventually(lambda: not hub._all and not hub._io._owner
                     and all(not t.channels for t in hub._io._threads))


def test_io_threads_default_to_one_on_two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    # every thread running Python takes turns at the GIL with the loop: on two CPUs one I/O
    # thread costs less than two
    for cpus, threads in ((1, 1), (2, 1), (3, 2), (64, 2)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert io.usable_cpus() == cpus
        assert TransportConfig().io_threads == threads
    assert TransportConfig(io_threads=3).io_threads == 3  # (a setting still wins)
