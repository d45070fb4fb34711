"""Two processes over real TLS sockets: a peer process (``peer.py``) and an endpoint here,
plus hand-made misbehaving peers speaking raw TLS."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator

import pytest

from blobmesh.errors import ProtocolError, StreamClosedError, TransportError
from blobmesh.transport import Identity, Stream, TransportConfig
from blobmesh.transport.tls import make_context
from blobmesh.wire import WIRE_VERSION, Data, Hello, Open, Settings, encode_frame, frame_header
from tests.transport.conftest import (
    EndpointFactory,
    Peer,
    echo,
    spawn_peer,
    stop_peer,
)
from tests.util import eventually

HELLO = encode_frame(Settings().hello())


async def test_streams_both_ways(endpoints: EndpointFactory, peer: Peer) -> None:
    a = await endpoints(handlers={"echo": echo})
    node = a.add_ticket(peer.ticket)
    s = await a.open_stream(node, "echo")
    await s.send(b"hi")
    assert await s.recv() == b"hi"
    back = await a.open_stream(node, "dialback")
    await back.send(str(a.ticket).encode())
    assert await back.recv() == b"ping from the peer"


async def test_many_concurrent_streams(endpoints: EndpointFactory, peer: Peer) -> None:
    a = await endpoints()
    node = a.add_ticket(peer.ticket)

    async def talk(i: int) -> None:
        s = await a.open_stream(node, "echo")
        for j in range(10):
            msg = f"{i}:{j}".encode() * (i + 1)
            await s.send(msg)
            assert await s.recv() == msg
        await s.close()
        with pytest.raises(StreamClosedError):
            await s.recv()

    await asyncio.gather(*(talk(i) for i in range(100)))
    assert len(a._all) == 1


async def test_large_transfers_with_small_windows(endpoints: EndpointFactory) -> None:
    window = 1024 * 1024
    p = await spawn_peer("--window", str(window))
    try:
        a = await endpoints(TransportConfig(stream_window=window, max_message_size=window))
        node = a.add_ticket(p.ticket)
        size = 64 * 1024 * 1024
        down = await a.open_stream(node, "source")
        await down.send(f"{size} {window}".encode())
        up = await a.open_stream(node, "sink")

        async def upload() -> None:
            block = memoryview(bytes(300_000))
            for _ in range(size // len(block)):
                await up.send(block)
            await up.close()

        async def download() -> int:
            got = 0
            while True:
                try:
                    got += len(await down.recv())
                except StreamClosedError:
                    return got

        got, _ = await asyncio.gather(download(), upload())
        assert got == size
        assert int(await up.recv()) == size // 300_000 * 300_000
    finally:
        await stop_peer(p)


async def test_peer_killed_mid_stream(endpoints: EndpointFactory) -> None:
    p = await spawn_peer()
    a = await endpoints()
    node = a.add_ticket(p.ticket)
    s = await a.open_stream(node, "source")
    await s.send(f"{1 << 40} 65536".encode())
    for _ in range(10):
        await s.recv()
    p.proc.kill()
    await p.proc.wait()
    with pytest.raises(TransportError) as info:
        async with asyncio.timeout(10):
            while True:
                await s.recv()
    assert not isinstance(info.value, StreamClosedError)
    assert a.connected_peers() == []


async def test_listener_side_idle_close_then_redial(endpoints: EndpointFactory) -> None:
    p = await spawn_peer("--idle", "0.2")
    try:
        a = await endpoints()
        node = a.add_ticket(p.ticket)
        for i in range(2):
            s = await a.open_stream(node, "echo")
            await s.send(b"x")
            assert await s.recv() == b"x"
            await s.close()
            await eventually(lambda: not a._all)
            assert i == 0 or a.connected_peers() == []
    finally:
        await stop_peer(p)


# --- misbehaving peers -------------------------------------------------------------------


def _raw_dial(addr: tuple[str, int]) -> ssl.SSLSocket:
    ctx = make_context(Identity.generate(), server=False)
    sock = ctx.wrap_socket(socket.create_connection(addr, timeout=5))
    sock.settimeout(5)
    return sock


def _read_until_eof(sock: ssl.SSLSocket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:  # reset, TLS alert or timeout: closed either way
        pass
    return data


BAD_FRAMES = {
    "garbage": b"\x00\x00\x00\x09GARBAGE!!",
    "oversized": struct.pack(">I", 1 << 31) + b"\x01",
    "unknown type": (lambda h: struct.pack(">IBH", 3 + len(h), WIRE_VERSION, len(h)) + h)(
        b"\x92\x63\x01"),
    "bad version": struct.pack(">IBH", 4, 9, 1) + b"\xc0",
    "payload on control frame": frame_header(Open(1, "echo"), 3) + b"abc",
    "data on unopened stream": encode_frame(Data(7, False), b"x"),
    "no hello": encode_frame(Open(1, "echo")),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
async def test_bad_dialer_is_dropped_others_unaffected(
        endpoints: EndpointFactory, peer: Peer, name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    a = await endpoints(handlers={"echo": echo})
    node = a.add_ticket(peer.ticket)
    good = await a.open_stream(node, "echo")
    await good.send(b"before")
    assert await good.recv() == b"before"

    def attack() -> bytes:
        with _raw_dial(a.listen_address) as sock:
            sock.sendall((b"" if name == "no hello" else HELLO) + BAD_FRAMES[name])
            return _read_until_eof(sock)

    with caplog.at_level(logging.WARNING, logger="blobmesh.transport"):
        await asyncio.wait_for(asyncio.to_thread(attack), 10)  # EOF: a closed it
    assert any("protocol error" in r.getMessage() for r in caplog.records)
    await good.send(b"after")
    assert await good.recv() == b"after"
    assert a.connected_peers() == [node]


@pytest.fixture
async def bad_listener() -> AsyncIterator[tuple[Identity, tuple[str, int]]]:
    """A TLS listener with a real identity that answers with garbage instead of Hello."""
    ident = Identity.generate()
    ctx = make_context(ident, server=True)
    lsock = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        try:
            raw, _ = lsock.accept()
        except OSError:
            return
        with ctx.wrap_socket(raw, server_side=True) as sock:
            sock.sendall(BAD_FRAMES["garbage"])
            _read_until_eof(sock)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield ident, lsock.getsockname()
    lsock.close()
    await asyncio.to_thread(t.join, 10)


async def test_bad_listener_fails_dial_with_protocol_error(
        endpoints: EndpointFactory, bad_listener: tuple[Identity, tuple[str, int]]) -> None:
    a = await endpoints()
    ident, addr = bad_listener
    a.add_peer_addresses(ident.node_id, [addr])
    with pytest.raises(ProtocolError):
        await a.open_stream(ident.node_id, "echo")


async def test_protocol_error_mid_stream_reaches_the_stream(endpoints: EndpointFactory) -> None:
    a = await endpoints(handlers={"echo": echo})
    got: list[BaseException] = []
    done = asyncio.Event()

    async def victim(stream: Stream) -> None:
        try:
            await stream.recv()
            await stream.recv()
        except TransportError as exc:
            got.append(exc)
        done.set()

    a.set_handler("victim", victim)

    def attack() -> None:
        with _raw_dial(a.listen_address) as sock:
            sock.sendall(HELLO + encode_frame(Open(1, "victim")))
            sock.sendall(encode_frame(Data(1, False), b"ok"))
            sock.sendall(encode_frame(Hello(1 << 20, 1 << 20, 1 << 20, 8)))  # second Hello
            _read_until_eof(sock)

    await asyncio.wait_for(asyncio.to_thread(attack), 10)
    await asyncio.wait_for(done.wait(), 5)
    assert len(got) == 1 and isinstance(got[0], ProtocolError)


async def test_keepalive_timeout_on_silent_peer(endpoints: EndpointFactory) -> None:
    """A peer that completes TLS and Hello, then goes silent (no Pongs)."""
    ident = Identity.generate()
    ctx = make_context(ident, server=True)
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        release = threading.Event()

        def serve() -> None:
            raw, _ = lsock.accept()
            with ctx.wrap_socket(raw, server_side=True) as sock:
                sock.sendall(HELLO)
                release.wait(10)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        a = await endpoints(TransportConfig(keepalive_interval=0.1, keepalive_timeout=0.3))
        a.add_peer_addresses(ident.node_id, [lsock.getsockname()])
        s = await a.open_stream(ident.node_id, "anything")
        with pytest.raises(TransportError, match="silent"):
            await asyncio.wait_for(s.recv(), 5)
        release.set()
        t.join(10)



def _tls_client(alpn: bool, cert: bool) -> ssl.SSLContext:
    ctx = make_context(Identity.generate(), server=False) if cert else ssl.SSLContext(
        ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["blobmesh/1"] if alpn else ["h2"])
    return ctx


@pytest.mark.parametrize(("alpn", "cert"), [(False, True), (True, False)])
async def test_listener_requires_alpn_and_certificate(
        endpoints: EndpointFactory, alpn: bool, cert: bool) -> None:
    a = await endpoints()

    def attempt() -> bytes:
        raw = socket.create_connection(a.listen_address, timeout=5)
        try:
            with _tls_client(alpn, cert).wrap_socket(raw) as sock:
                sock.sendall(HELLO)
                return _read_until_eof(sock)
        except (ssl.SSLError, OSError):
            return b""  # refused during the handshake

    assert await asyncio.wait_for(asyncio.to_thread(attempt), 10) == b""
    assert a.connected_peers() == []
