"""Endpoints in one process over real TLS sockets on 127.0.0.1: stream semantics, dialing,
connection reuse, timeouts."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest

from blobmesh.errors import (
    DialTimeoutError,
    PeerIdentityError,
    StreamClosedError,
    TransportError,
)
from blobmesh.transport import Endpoint, Identity, Network, Stream, TransportConfig
from blobmesh.transport.connection import PeerConnection
from blobmesh.wire import MIN_FRAME_SIZE
from tests.transport.conftest import FAST, EndpointFactory, echo, recv_all
from tests.util import eventually


async def pair(endpoints: EndpointFactory, config: TransportConfig = FAST,
               ) -> tuple[Endpoint, Endpoint]:
    a = await endpoints(config)
    b = await endpoints(config, handlers={"echo": echo})
    a.add_ticket(b.ticket)
    return a, b


async def test_echo_close_and_reuse(endpoints: EndpointFactory) -> None:
    a, b = await pair(endpoints)
    net: Network = a  # the protocol services code against
    s = await net.open_stream(b.node_id, "echo")
    assert s.peer == b.node_id and s.protocol == "echo"
    for msg in (b"hello", b"", bytes(3 * 1024 * 1024 + 7)):
        await s.send(msg)
        assert await s.recv() == msg
    await s.close()
    with pytest.raises(StreamClosedError):
        await s.recv()
    with pytest.raises(TransportError):
        await s.send(b"after close")
    s2 = await a.open_stream(b.node_id, "echo")
    await s2.send(b"again")
    assert await s2.recv() == b"again"
    assert a.connected_peers() == [b.node_id]
    assert b.connected_peers() == [a.node_id]


async def test_memoryview_and_bytearray_are_sent_safely(endpoints: EndpointFactory) -> None:
    a, b = await pair(endpoints)
    s = await a.open_stream(b.node_id, "echo")
    buf = bytearray(b"x" * 2_000_000)
    await s.send(memoryview(buf))
    buf[:] = b"y" * len(buf)  # send returned: the buffer is ours again
    assert await s.recv() == b"x" * 2_000_000
    await s.send(memoryview(buf)[10:20])
    assert await s.recv() == b"y" * 10


async def test_a_head_is_sent_in_front_of_the_message(endpoints: EndpointFactory) -> None:
    a, b = await pair(endpoints, dataclasses.replace(FAST, max_frame_size=MIN_FRAME_SIZE))
    s = await a.open_stream(b.node_id, "echo")
    body = bytes(range(256)) * 800  # 200 KB: many frames
    for head in (b"h", bytes(range(200)) * 200):  # the long head spans three frames itself
        await s.send(memoryview(body), head=head)
        assert await s.recv() == head + body
        await s.send(b"", head=head)
        assert await s.recv() == head
    with pytest.raises(ValueError, match="exceeds the peer's limit"):
        await s.send(bytes(FAST.max_message_size), head=b"x")


@pytest.mark.parametrize("window", ["stream", "connection"])
async def test_a_window_sized_message_after_small_ones_is_delivered(
        endpoints: EndpointFactory, window: str) -> None:
    # before: credit went back in quarter-window batches, so the bytes of the small messages
    # were held back and the window-sized message waited for them for ever
    size = 256 * 1024
    cfg = dataclasses.replace(FAST, max_message_size=size,
                              stream_window=size if window == "stream" else 2 * size,
                              connection_window=size if window == "connection" else 4 * size)
    a, b = await pair(endpoints, cfg)
    s = await a.open_stream(b.node_id, "echo")
    for msg in (b"small", b"x" * 1000, bytes(size)):
        await asyncio.wait_for(s.send(msg), 5)
        assert await asyncio.wait_for(s.recv(), 5) == msg


async def test_a_one_frame_message_waits_for_credit_instead_of_splitting(
        endpoints: EndpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # before: the third message was sent as the 56 KiB the stream window had left, then the
    # rest, and the receiver joined the two (a copy of the whole message)
    window = 256 * 1024
    cfg = dataclasses.replace(FAST, stream_window=window, max_message_size=window)
    frames: list[tuple[int, bool]] = []
    send_data = PeerConnection.send_data

    def spy(self: PeerConnection, stream_id: int, data: memoryview, *, more: bool,
            head: bytes) -> None:
        frames.append((len(head) + len(data), more))
        send_data(self, stream_id, data, more=more, head=head)

    monkeypatch.setattr(PeerConnection, "send_data", spy)
    hold = asyncio.Event()
    got: list[bytes] = []

    async def reads_later(stream: Stream) -> None:
        await hold.wait()
        got.extend(await recv_all(stream))

    a, b = await pair(endpoints, cfg)
    b.set_handler("later", reads_later)
    s = await a.open_stream(b.node_id, "later")
    msg = bytes(100 * 1024)
    sending = asyncio.create_task(s.send(msg))
    await asyncio.wait_for(sending, 5)
    await asyncio.wait_for(s.send(msg), 5)
    third = asyncio.create_task(s.send(msg))  # 56 KiB of credit left
    await asyncio.sleep(0.2)
    assert not third.done()
    assert frames == [(len(msg), False)] * 2  # nothing of the third one yet
    hold.set()
    await asyncio.wait_for(third, 5)
    await s.close()
    await eventually(lambda: len(got) == 3)
    assert got == [msg] * 3
    assert frames == [(len(msg), False)] * 3


async def test_flush_returns_once_what_came_before_is_written(
        endpoints: EndpointFactory) -> None:
    a, b = await pair(endpoints)
    s = await a.open_stream(b.node_id, "echo")
    conn = s._conn
    big = bytes(8 * 1024 * 1024)
    for _ in range(3):
        await s.send(big)
        before = conn.queued
        await s.send(b"next", flush=True)
        assert conn._channel.written >= before
        assert await s.recv() == big
        assert await s.recv() == b"next"


async def test_try_send_sends_small_messages_at_once_in_order(
        endpoints: EndpointFactory) -> None:
    window = 256 * 1024
    cfg = dataclasses.replace(FAST, stream_window=window, max_message_size=window)
    hold = asyncio.Event()
    got: list[bytes] = []

    async def reads_later(stream: Stream) -> None:
        await hold.wait()
        got.extend(await recv_all(stream))

    a, b = await pair(endpoints, cfg)
    b.set_handler("later", reads_later)
    s = await a.open_stream(b.node_id, "later")
    assert s.try_send(b"first")  # nothing in its way: queued without awaiting
    big = bytes(window // 2)

    async def two() -> None:
        await s.send(big)
        await s.send(big)  # more than the window left: waits for credit, mid-message

    sending = asyncio.create_task(two())
    await asyncio.sleep(0.2)
    assert not sending.done()
    assert not s.try_send(b"behind")  # would overtake the message still being sent
    hold.set()
    await asyncio.wait_for(sending, 5)
    assert s.try_send(b"last")
    await s.close()
    await eventually(lambda: len(got) == 4)
    assert got == [b"first", big, big, b"last"]
    s.reset()
    with pytest.raises(TransportError):
        await s.send(b"x")
    assert not s.try_send(b"after reset")


async def test_message_size_limit(endpoints: EndpointFactory) -> None:
    a, b = await pair(endpoints)
    s = await a.open_stream(b.node_id, "echo")
    with pytest.raises(ValueError, match="exceeds the peer's limit"):
        await s.send(bytes(FAST.max_message_size + 1))


async def test_unknown_protocol_resets(endpoints: EndpointFactory) -> None:
    a, b = await pair(endpoints)
    s = await a.open_stream(b.node_id, "nobody-home")
    with pytest.raises(TransportError, match="no handler"):
        await s.recv()


async def test_reset_both_ways(endpoints: EndpointFactory) -> None:
    got: asyncio.Queue[BaseException] = asyncio.Queue()

    async def waits(stream: Stream) -> None:
        try:
            await stream.recv()
        except TransportError as exc:
            got.put_nowait(exc)

    async def fails(stream: Stream) -> None:
        raise RuntimeError("boom")

    a, b = await pair(endpoints)
    b.set_handler("waits", waits)
    b.set_handler("fails", fails)
    s = await a.open_stream(b.node_id, "waits")
    await s.send(b"")
    s2 = await a.open_stream(b.node_id, "waits")
    s2.reset("changed my mind")
    exc = await asyncio.wait_for(got.get(), 5)
    assert "changed my mind" in str(exc)
    with pytest.raises(TransportError, match="changed my mind"):
        await s2.recv()
    s3 = await a.open_stream(b.node_id, "fails")
    with pytest.raises(TransportError, match="handler failed"):
        await s3.recv()


async def test_handler_return_closes_its_side(endpoints: EndpointFactory) -> None:
    async def one_reply(stream: Stream) -> None:
        await stream.send(b"bye")

    a, b = await pair(endpoints)
    b.set_handler("one", one_reply)
    s = await a.open_stream(b.node_id, "one")
    assert await recv_all(s) == [b"bye"]
    await s.send(b"ignored by nobody")  # the peer discards, no error, no leak
    await s.close()


async def test_streams_both_directions_share_one_connection(endpoints: EndpointFactory) -> None:
    a, b = await pair(endpoints)
    a.set_handler("echo", echo)
    s = await a.open_stream(b.node_id, "echo")
    await s.send(b"1")
    await s.recv()
    back = await b.open_stream(a.node_id, "echo")  # no address needed: reuses the connection
    await back.send(b"2")
    assert await back.recv() == b"2"
    assert len(a._all) == len(b._all) == 1


async def test_simultaneous_dials_converge_on_one_connection(endpoints: EndpointFactory) -> None:
    a, b = await pair(endpoints)
    a.set_handler("echo", echo)
    b.add_ticket(a.ticket)
    sa, sb = await asyncio.gather(a.open_stream(b.node_id, "echo"),
                                  b.open_stream(a.node_id, "echo"))
    for s in (sa, sb):
        await s.send(b"x")
        assert await s.recv() == b"x"
        await s.close()
    for ep in (a, b):
        s = await ep.open_stream(b.node_id if ep is a else a.node_id, "echo")
        await s.send(b"y")
        assert await s.recv() == b"y"
    winner = {c.dialer for c in (a._conns[b.node_id], b._conns[a.node_id])}
    assert winner == {min(a.node_id, b.node_id)}


async def test_concurrent_openers_share_one_dial(endpoints: EndpointFactory) -> None:
    a, b = await pair(endpoints)
    streams = await asyncio.gather(*(a.open_stream(b.node_id, "echo") for _ in range(20)))
    assert len(a._all) == 1
    await asyncio.gather(*(s.send(b"m") for s in streams))
    assert [await s.recv() for s in streams] == [b"m"] * 20


async def test_wrong_node_id(endpoints: EndpointFactory) -> None:
    a, b = await pair(endpoints)
    impostor = Identity.generate().node_id
    a.add_peer_addresses(impostor, b.ticket.addrs)
    with pytest.raises(PeerIdentityError) as info:
        await a.open_stream(impostor, "echo")
    assert str(impostor) in str(info.value) and str(b.node_id) in str(info.value)


async def test_no_address_and_refused(endpoints: EndpointFactory) -> None:
    a = await endpoints()
    nobody = Identity.generate().node_id
    with pytest.raises(TransportError, match="no known address"):
        await a.open_stream(nobody, "echo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a.add_peer_addresses(nobody, [("127.0.0.1", port)])
    with pytest.raises(TransportError, match="cannot reach"):
        await a.open_stream(nobody, "echo")


async def test_dial_timeout_black_hole(endpoints: EndpointFactory) -> None:
    a = await endpoints(TransportConfig(dial_timeout=0.3))
    with socket.socket() as hole:  # accepts TCP (backlog), never speaks TLS
        hole.bind(("127.0.0.1", 0))
        hole.listen()
        nobody = Identity.generate().node_id
        a.add_peer_addresses(nobody, [hole.getsockname()])
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(DialTimeoutError, match="timed out"):
            await a.open_stream(nobody, "echo")
        assert loop.time() - t0 < 2


async def test_listener_drops_silent_clients(endpoints: EndpointFactory) -> None:
    a, b = await pair(endpoints, TransportConfig(dial_timeout=0.3))
    with socket.create_connection(b.listen_address):
        await asyncio.sleep(0.6)  # the handshake timeout passes; b must still serve
    s = await a.open_stream(b.node_id, "echo")
    await s.send(b"ok")
    assert await s.recv() == b"ok"


async def test_idle_connection_closes_and_redials(endpoints: EndpointFactory) -> None:
    cfg = TransportConfig(idle_timeout=0.2, keepalive_interval=5, keepalive_timeout=10)
    a, b = await pair(endpoints, cfg)
    s = await a.open_stream(b.node_id, "echo")
    await s.send(b"1")
    await s.recv()
    await asyncio.sleep(0.5)
    assert a.connected_peers() == [b.node_id]  # an open stream keeps it alive
    await s.close()
    await eventually(lambda: not a._all and not b._all)
    s = await a.open_stream(b.node_id, "echo")
    await s.send(b"2")
    assert await s.recv() == b"2"


async def test_keepalive_keeps_quiet_connection_open(endpoints: EndpointFactory) -> None:
    cfg = TransportConfig(keepalive_interval=0.1, keepalive_timeout=0.35)
    a, b = await pair(endpoints, cfg)
    s = await a.open_stream(b.node_id, "echo")
    await asyncio.sleep(1.0)  # several keepalive timeouts with no stream traffic
    await s.send(b"still here")
    assert await s.recv() == b"still here"


async def test_flow_control_isolates_streams(endpoints: EndpointFactory) -> None:
    window = 256 * 1024
    cfg = TransportConfig(stream_window=window, max_message_size=window)
    hold = asyncio.Event()

    async def never_reads(stream: Stream) -> None:
        await hold.wait()
        assert len(b"".join(await recv_all(stream))) == 40 * 64 * 1024

    a, b = await pair(endpoints, cfg)
    b.set_handler("slow", never_reads)
    slow = await a.open_stream(b.node_id, "slow")

    async def fill() -> None:
        for _ in range(40):
            await slow.send(bytes(64 * 1024))
        await slow.close()

    filler = asyncio.create_task(fill())
    await asyncio.sleep(0.3)
    assert not filler.done()  # blocked by the window, not buffered without limit
    fast = await a.open_stream(b.node_id, "echo")
    for _ in range(10):
        await fast.send(b"z" * 1000)
        assert await fast.recv() == b"z" * 1000
    hold.set()
    await asyncio.wait_for(filler, 5)


async def test_aclose_fails_open_streams(endpoints: EndpointFactory) -> None:
    a, b = await pair(endpoints)
    s = await a.open_stream(b.node_id, "echo")
    await s.send(b"1")
    await s.recv()
    pending = asyncio.create_task(s.recv())
    await asyncio.sleep(0.05)
    await b.aclose()
    with pytest.raises(TransportError):
        await asyncio.wait_for(pending, 5)
    with pytest.raises(TransportError):
        await b.open_stream(a.node_id, "echo")


async def test_wildcard_listener_ticket_is_dialable(endpoints: EndpointFactory) -> None:
    b = await Endpoint.start(Identity.generate(), listen=("0.0.0.0", 0))
    try:
        b.set_handler("echo", echo)
        assert ("127.0.0.1", b.listen_address[1]) in b.ticket.addrs
        a = await endpoints()
        s = await a.open_stream(a.add_ticket(b.ticket), "echo")
        await s.send(b"via wildcard")
        assert await s.recv() == b"via wildcard"
    finally:
        await b.aclose()
