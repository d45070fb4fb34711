"""The connection state machine, two instances wired back to back (no sockets)."""

from __future__ import annotations

import pytest

from blobmesh.errors import ProtocolError, TransportError
from blobmesh.wire import (
    DATA_OVERHEAD,
    MIN_FRAME_SIZE,
    Close,
    Connection,
    Credit,
    CreditAvailable,
    Data,
    Event,
    GoAwayReceived,
    Hello,
    HelloReceived,
    MessageReceived,
    Open,
    Ping,
    Pong,
    PongReceived,
    Reset,
    Role,
    Settings,
    StreamEnded,
    StreamOpened,
    StreamReset,
    encode_frame,
)

SMALL = Settings(max_frame_size=MIN_FRAME_SIZE, stream_window=64 * 1024,
                 max_message_size=48 * 1024, max_streams=4)


def transfer(src: Connection, dst: Connection) -> list[Event]:
    return dst.feed(b"".join(bytes(b) for b in src.data_to_send()))


def connected(settings: Settings = SMALL) -> tuple[Connection, Connection]:
    a, b = Connection(Role.DIALER, settings), Connection(Role.LISTENER, settings)
    assert transfer(a, b) == [HelloReceived(settings)]
    assert transfer(b, a) == [HelloReceived(settings)]
    return a, b


def listener_after_hello(settings: Settings = SMALL) -> Connection:
    b = Connection(Role.LISTENER, settings)
    b.feed(encode_frame(settings.hello()))
    b.data_to_send()
    return b


def test_hello_is_first_and_only_once() -> None:
    b = Connection(Role.LISTENER)
    with pytest.raises(ProtocolError, match="expected Hello"):
        b.feed(encode_frame(Ping(1)))
    b = listener_after_hello()
    with pytest.raises(ProtocolError, match="second Hello"):
        b.feed(encode_frame(SMALL.hello()))


def test_unusable_peer_limits() -> None:
    b = Connection(Role.LISTENER)
    with pytest.raises(ProtocolError, match="unusable"):
        b.feed(encode_frame(Hello(MIN_FRAME_SIZE, 10, 20, 1)))  # message > window


def test_open_needs_hello_and_ids_alternate() -> None:
    a = Connection(Role.DIALER, SMALL)
    with pytest.raises(TransportError):
        a.open_stream("x")
    a, b = connected()
    assert [a.open_stream("p") for _ in range(2)] == [1, 3]
    assert b.open_stream("q") == 2
    assert transfer(a, b) == [StreamOpened(1, "p"), StreamOpened(3, "p")]
    assert transfer(b, a) == [StreamOpened(2, "q")]


def test_messages_fragmented_and_reassembled() -> None:
    a, b = connected()
    sid = a.open_stream("p")
    msg = bytes(range(256)) * 160  # 40 KiB: three frames at this frame size
    off = 0
    while off < len(msg):
        n = min(a.send_budget(sid), len(msg) - off)
        a.send_data(sid, memoryview(msg)[off:off + n], more=off + n < len(msg))
        off += n
    a.send_data(sid, b"")
    events = transfer(a, b)
    assert events == [StreamOpened(sid, "p"), MessageReceived(sid, msg), MessageReceived(sid, b"")]


def test_flow_control_window_and_credit() -> None:
    a, b = connected()
    sid = a.open_stream("p")
    chunk = MIN_FRAME_SIZE - DATA_OVERHEAD
    assert a.send_budget(sid) == chunk
    sent = 0
    while a.send_budget(sid):
        n = a.send_budget(sid)
        a.send_data(sid, bytes(n))
        sent += n
    assert sent == SMALL.stream_window
    with pytest.raises(ValueError, match="budget"):
        a.send_data(sid, b"x")
    events = transfer(a, b)
    got = [e for e in events if isinstance(e, MessageReceived)]
    assert sum(len(e.data) for e in got) == sent
    b.consumed(sid, 1000)  # below a quarter of the window: no Credit frame yet
    assert b.data_to_send() == []
    b.consumed(sid, SMALL.stream_window // 4)
    assert transfer(b, a) == [CreditAvailable(sid)]
    assert a.send_budget(sid) == min(chunk, 1000 + SMALL.stream_window // 4)


def test_peer_overrunning_the_window() -> None:
    b = listener_after_hello()
    b.feed(encode_frame(Open(1, "p")))
    frame = MIN_FRAME_SIZE - DATA_OVERHEAD
    with pytest.raises(ProtocolError, match="window"):
        for _ in range(SMALL.stream_window // frame + 1):
            b.feed(encode_frame(Data(1, False), bytes(frame)))


def test_message_too_large() -> None:
    b = listener_after_hello()
    b.feed(encode_frame(Open(1, "p")))
    frame = MIN_FRAME_SIZE - DATA_OVERHEAD
    with pytest.raises(ProtocolError, match="message exceeds"):
        for _ in range(SMALL.max_message_size // frame + 1):
            b.feed(encode_frame(Data(1, True), bytes(frame)))


def test_half_close_both_sides_then_forgotten() -> None:
    a, b = connected()
    sid = a.open_stream("p")
    a.close_stream(sid)
    assert transfer(a, b) == [StreamOpened(sid, "p"), StreamEnded(sid)]
    with pytest.raises(TransportError, match="closed for sending"):
        a.send_data(sid, b"late")
    b.send_data(sid, b"reply")
    b.close_stream(sid)
    assert transfer(b, a) == [MessageReceived(sid, b"reply"), StreamEnded(sid)]
    assert a.stream_count() == b.stream_count() == 0


def test_close_violations() -> None:
    b = listener_after_hello()
    b.feed(encode_frame(Open(1, "p")) + encode_frame(Close(1)))
    with pytest.raises(ProtocolError, match="closed twice"):
        b.feed(encode_frame(Close(1)))
    b = listener_after_hello()
    b.feed(encode_frame(Open(1, "p")) + encode_frame(Close(1)))
    with pytest.raises(ProtocolError, match="after the peer closed"):
        b.feed(encode_frame(Data(1, False), b"x"))
    b = listener_after_hello()
    b.feed(encode_frame(Open(1, "p")) + encode_frame(Data(1, True), b"x"))
    with pytest.raises(ProtocolError, match="mid-message"):
        b.feed(encode_frame(Close(1)))


def test_reset_and_frames_racing_it() -> None:
    a, b = connected()
    sid = a.open_stream("p")
    transfer(a, b)
    b.reset_stream(sid, "nope")
    a.send_data(sid, b"in flight")  # a has not seen the reset yet
    assert transfer(b, a) == [StreamReset(sid, "nope")]
    assert transfer(a, b) == []  # data for a stream b reset: dropped quietly
    with pytest.raises(TransportError, match="reset"):
        a.send_data(sid, b"x")
    b.reset_stream(sid)  # idempotent
    assert b.data_to_send() == []


def test_frames_for_streams_never_opened() -> None:
    for frame in (Data(1, False), Close(1), Credit(1, 5), Reset(1, "")):
        b = listener_after_hello()
        with pytest.raises(ProtocolError, match="never opened"):
            b.feed(encode_frame(frame))
    b = listener_after_hello()
    with pytest.raises(ProtocolError, match="never opened"):
        b.feed(encode_frame(Credit(2, 5)))  # b's own id space, not opened by b


@pytest.mark.parametrize("sid", [2, 4])
def test_open_with_wrong_parity(sid: int) -> None:
    b = listener_after_hello()
    with pytest.raises(ProtocolError, match="invalid stream id"):
        b.feed(encode_frame(Open(sid, "p")))


def test_open_ids_must_increase() -> None:
    b = listener_after_hello()
    b.feed(encode_frame(Open(5, "p")))
    with pytest.raises(ProtocolError, match="invalid stream id"):
        b.feed(encode_frame(Open(3, "p")))


def test_stream_limit_refuses_with_reset() -> None:
    b = listener_after_hello()
    events = b.feed(b"".join(encode_frame(Open(i, "p")) for i in range(1, 12, 2)))
    assert len(events) == SMALL.max_streams
    out = b"".join(bytes(x) for x in b.data_to_send())
    assert out == encode_frame(Reset(9, "too many streams")) + encode_frame(
        Reset(11, "too many streams"))


def test_ping_pong_and_goaway() -> None:
    a, b = connected()
    a.send_ping(42)
    assert transfer(a, b) == []
    assert transfer(b, a) == [PongReceived(42)]
    b.send_goaway("idle")
    assert transfer(b, a) == [GoAwayReceived("idle")]
    with pytest.raises(TransportError, match="going away"):
        a.open_stream("p")
    with pytest.raises(TransportError, match="going away"):
        b.open_stream("p")


def test_streams_opened_after_our_goaway_are_still_served() -> None:
    a, b = connected()
    b.send_goaway("idle")
    sid = a.open_stream("p")  # a has not seen the GoAway yet
    assert transfer(a, b) == [StreamOpened(sid, "p")]


def test_credit_overflow() -> None:
    b = listener_after_hello()
    b.open_stream("p")
    with pytest.raises(ProtocolError, match="absurd"):
        for _ in range(300):
            b.feed(encode_frame(Credit(2, 0xFFFFFFFF)))


def test_pong_for_unsolicited_is_harmless() -> None:
    b = listener_after_hello()
    assert b.feed(encode_frame(Pong(9))) == [PongReceived(9)]


def test_settings_validation() -> None:
    with pytest.raises(ValueError):
        Settings(max_frame_size=100)
    with pytest.raises(ValueError):
        Settings(stream_window=10, max_message_size=20)
    with pytest.raises(ValueError):
        Settings(max_streams=0)
