"""Two processes over real TLS sockets: a peer process (``peer.py``) and an endpoint here,
plus hand-made misbehaving peers speaking raw TLS."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from blobmesh.errors import ProtocolError, StreamClosedError, TransportError
from blobmesh.transport import Endpoint, Identity, NodeId, Stream, TransportConfig
from blobmesh.transport.connection import PeerConnection
from blobmesh.transport.io import RX_FRAMES_MAX
from blobmesh.transport.tls import make_context
from blobmesh.wire import (
    MIN_FRAME_SIZE,
    WIRE_VERSION,
    Data,
    Hello,
    Open,
    Ping,
    Reset,
    Settings,
    encode_frame,
    frame_header,
)
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


# --- hostile peers: bounded memory, deadlines and caps ----------------------------------------

SMALL_BUFFERS = TransportConfig(max_frame_size=MIN_FRAME_SIZE, write_buffer=64 * 1024)


def _flood(addr: tuple[str, int], burst: Callable[[int], bytes]) -> tuple[int, bool]:
    """Send ``burst(i)`` for i = 0, 1... without ever reading; stop once the peer stops
    reading (a send blocks for a second) or after 20 s.  Returns (bytes sent, blocked)."""
    sock = _raw_dial(addr)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # our Pongs pile up soon
    sock.settimeout(1.0)
    sent = 0
    deadline = time.monotonic() + 20
    try:
        sock.sendall(HELLO)
        i = 0
        while time.monotonic() < deadline:
            data = burst(i)
            sock.sendall(data)
            sent += len(data)
            i += 1
    except TimeoutError:
        return sent, True
    finally:
        _HELD.append(sock)  # kept open, unread, until the test ends
    return sent, False


_HELD: list[ssl.SSLSocket] = []


@pytest.fixture
def held_sockets() -> Iterator[None]:
    yield
    while _HELD:
        _HELD.pop().close()


def _hostile(a: Endpoint, good: NodeId) -> PeerConnection:
    [conn] = [c for c in a._all if c.peer != good]
    return conn


async def _still_serves(a: Endpoint, node: NodeId) -> None:
    s = await a.open_stream(node, "echo")
    await s.send(b"still here")
    assert await asyncio.wait_for(s.recv(), 10) == b"still here"
    await s.close()


@pytest.mark.usefixtures("held_sockets")
async def test_ping_flood_never_reading_is_bounded(endpoints: EndpointFactory,
                                                   peer: Peer) -> None:
    a = await endpoints(SMALL_BUFFERS)
    node = a.add_ticket(peer.ticket)
    await _still_serves(a, node)
    rss = _rss()
    pings = encode_frame(Ping(1)) * 50_000  # 300 KB of Pings per burst
    sent, blocked = await asyncio.to_thread(_flood, a.listen_address, lambda _: pings)
    assert blocked, f"sent {sent} bytes of Pings and we never stopped reading"
    conn = _hostile(a, node)
    channel = conn._channel
    # + the answers to the batch the loop works on and the one read ahead
    assert channel.backlog <= channel.write_limit + 2 * RX_FRAMES_MAX * len(encode_frame(Ping(1)))
    assert len(channel._rx) <= RX_FRAMES_MAX
    await _still_serves(a, node)  # the other peer is unaffected
    assert _rss() - rss < 64 * 1024 * 1024


@pytest.mark.usefixtures("held_sockets")
async def test_open_flood_for_unknown_protocol_is_bounded(endpoints: EndpointFactory,
                                                          peer: Peer) -> None:
    a = await endpoints(SMALL_BUFFERS)
    node = a.add_ticket(peer.ticket)
    rss = _rss()
    per_burst = 5000

    def opens(i: int) -> bytes:
        first = 1 + 2 * per_burst * i
        return b"".join(encode_frame(Open(sid, "nobody-serves-this"))
                        for sid in range(first, first + 2 * per_burst, 2))

    sent, blocked = await asyncio.to_thread(_flood, a.listen_address, opens)
    assert blocked, f"sent {sent} bytes of Opens and we never stopped reading"
    conn = _hostile(a, node)
    reset = encode_frame(Reset(1, "no handler for 'nobody-serves-this'"))
    assert conn._channel.backlog <= conn._channel.write_limit + 2 * RX_FRAMES_MAX * len(reset)
    assert len(conn._streams) == 0  # each was reset at once
    await _still_serves(a, node)
    assert _rss() - rss < 64 * 1024 * 1024


async def test_slowloris_is_dropped(endpoints: EndpointFactory, peer: Peer,
                                    caplog: pytest.LogCaptureFixture) -> None:
    a = await endpoints(TransportConfig(keepalive_interval=0.2, keepalive_timeout=0.6))
    node = a.add_ticket(peer.ticket)
    frame = encode_frame(Data(1, False), bytes(1000))

    def trickle() -> float:
        with _raw_dial(a.listen_address) as sock:
            sock.sendall(HELLO + encode_frame(Open(1, "echo")))
            started = time.monotonic()
            try:
                for byte in frame:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.1)
            except OSError:
                pass
            _read_until_eof(sock)
            return time.monotonic() - started

    with caplog.at_level(logging.WARNING, logger="blobmesh.transport"):
        took = await asyncio.wait_for(asyncio.to_thread(trickle), 30)
    assert took < 5
    assert any("slowloris" in r.getMessage() for r in caplog.records)
    await _still_serves(a, node)


async def test_handshake_deadline_for_a_peer_sending_no_hello(
        endpoints: EndpointFactory) -> None:
    a = await endpoints(TransportConfig(handshake_timeout=0.5))

    def silent() -> float:
        with _raw_dial(a.listen_address) as sock:  # TLS completes, then nothing
            started = time.monotonic()
            _read_until_eof(sock)
            return time.monotonic() - started

    assert await asyncio.wait_for(asyncio.to_thread(silent), 10) < 3
    await eventually(lambda: not a._all)


def _try_connect(addr: tuple[str, int]) -> ssl.SSLSocket | None:
    """A raw TLS connection that sent its Hello and got ours; None if refused."""
    try:
        sock = _raw_dial(addr)
        sock.settimeout(15)
        sock.sendall(HELLO)
        if not sock.recv(1):
            sock.close()
            return None
    except TimeoutError:
        raise
    except OSError:  # reset or EOF during the handshake: refused
        return None
    _HELD.append(sock)
    return sock


@pytest.mark.usefixtures("held_sockets")
async def test_connection_cap(endpoints: EndpointFactory, peer: Peer) -> None:
    a = await endpoints(TransportConfig(max_connections=3), handlers={"echo": echo})
    node = a.add_ticket(peer.ticket)
    await _still_serves(a, node)  # a dialed: 1 of 3
    got = [await asyncio.to_thread(_try_connect, a.listen_address) for _ in range(4)]
    assert [s is not None for s in got] == [True, True, False, False]
    assert a.refused == 2
    await _still_serves(a, node)


@pytest.mark.usefixtures("held_sockets")
async def test_admission_timeout_and_unadmitted_cap(endpoints: EndpointFactory) -> None:
    cfg = TransportConfig(admission_timeout=1.0, max_unadmitted=2, keepalive_interval=0.3,
                          keepalive_timeout=5)
    a = await endpoints(cfg, handlers={"echo": echo})
    admitted = await endpoints()
    s = await admitted.open_stream(admitted.add_ticket(a.ticket), "echo")
    await s.send(b"1")
    assert await s.recv() == b"1"
    a.mark_admitted(admitted.node_id)  # the space would do this
    strangers = [await asyncio.to_thread(_try_connect, a.listen_address) for _ in range(2)]
    assert all(strangers)
    assert await asyncio.to_thread(_try_connect, a.listen_address) is None  # over the cap
    assert a.refused == 1
    for sock in strangers:  # both closed by the deadline, whatever they do
        assert sock is not None
        t0 = time.monotonic()
        await asyncio.to_thread(_read_until_eof, sock)
        assert time.monotonic() - t0 < 3
    await eventually(lambda: len(a._all) == 1)
    await s.send(b"2")  # the admitted peer's connection outlived the deadline
    assert await s.recv() == b"2"
    assert await asyncio.to_thread(_try_connect, a.listen_address) is not None  # room again


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
