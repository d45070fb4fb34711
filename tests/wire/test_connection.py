"""The connection state machine, two instances wired back to back (no sockets)."""

from __future__ import annotations

import pytest

from blobmesh.errors import ProtocolError, TransportError
from blobmesh.wire import (
    DATA_OVERHEAD,
    MIN_FRAME_SIZE,
    Close,
    Connection,
    ConnectionCredit,
    ConnectionTerminated,
    Credit,
    CreditAvailable,
    Data,
    Event,
    Frame,
    FrameDecoder,
    GoAwayReceived,
    Hello,
    HelloReceived,
    Message,
    MessageReceived,
    Open,
    Ping,
    Pong,
    PongReceived,
    Reset,
    Role,
    Settings,
    State,
    StreamEnded,
    StreamOpened,
    StreamReset,
    Timers,
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


def test_a_head_goes_in_front_of_the_data_and_counts_against_the_window() -> None:
    a, b = connected()
    sid = a.open_stream("p")
    with pytest.raises(ValueError, match="budget"):
        a.send_data(sid, bytes(a.send_budget(sid) - 1), head=b"xy")
    a.send_data(sid, memoryview(b"payload"), head=b"head:")
    sent = len(b"head:payload")
    while a.send_budget(sid):
        sent += a.send_budget(sid)
        a.send_data(sid, bytes(a.send_budget(sid) - 1), head=b"x")
    assert sent == SMALL.stream_window  # the heads counted against the window
    events = transfer(a, b)
    assert events[:2] == [StreamOpened(sid, "p"), MessageReceived(sid, b"head:payload")]
    assert all(e.data[:1] == b"x" for e in events[2:] if isinstance(e, MessageReceived))


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


def deliver(a: Connection, b: Connection) -> list[int]:
    """Move a's frames to b, the application consuming every message at once, and b's
    answers (credit) back; the sizes of the messages delivered."""
    got = []
    for e in transfer(a, b):
        if isinstance(e, MessageReceived):
            got.append(len(e.data))
            b.consumed(e.stream_id, len(e.data))
    transfer(b, a)
    return got


@pytest.mark.parametrize("window", ["stream", "connection"])
def test_a_window_sized_message_after_small_ones_completes(window: str) -> None:
    # credit goes back in quarter-window batches: the few consumed bytes short of a batch
    # must not be window that a message as large as the whole window then never gets
    w = 64 * 1024
    s = Settings(max_frame_size=MIN_FRAME_SIZE, max_message_size=w, max_streams=4,
                 stream_window=w if window == "stream" else 2 * w,
                 connection_window=w if window == "connection" else 4 * w)
    a, b = Connection(Role.DIALER, s), Connection(Role.LISTENER, s)
    transfer(a, b)
    transfer(b, a)
    sid = a.open_stream("p")
    assert a.reserve(sid, 100)
    a.send_data(sid, bytes(100))
    assert deliver(a, b) == [100]
    got: list[int] = []
    framed = 0
    for _ in range(2 * w // (MIN_FRAME_SIZE - DATA_OVERHEAD)):  # more rounds than frames
        if framed < w and a.reserve(sid, w) and (n := min(a.send_budget(sid), w - framed)):
            a.send_data(sid, bytes(n), more=framed + n < w)
            framed += n
        got += deliver(a, b)
    assert got == [w]


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


# --- protocol 2: ERROR state, timers (fake clock), connection window, priorities ----------

TIMERS = Timers(keepalive_interval=10, keepalive_timeout=30, idle_timeout=60, hello_timeout=5)


def timed_pair(timers: Timers = TIMERS, settings: Settings = SMALL,
               ) -> tuple[Connection, Connection]:
    a = Connection(Role.DIALER, settings, timers=timers, now=0.0)
    b = Connection(Role.LISTENER, settings, timers=timers, now=0.0)
    return a, b


def pump(a: Connection, b: Connection, now: float) -> list[Event]:
    """Deliver everything both ways at ``now`` (until quiet); b's events are returned."""
    events: list[Event] = []
    for _ in range(4):
        got_b = b.feed(b"".join(bytes(x) for x in a.data_to_send(now)), now)
        got_a = a.feed(b"".join(bytes(x) for x in b.data_to_send(now)), now)
        events += got_b
        if not got_a and not got_b:
            break
    return events


def sent_messages(conn: Connection) -> list[Message]:
    return [f.message for f in FrameDecoder().feed(
        b"".join(bytes(x) for x in conn.data_to_send()))]


def test_error_state_refuses_all_later_input() -> None:
    b = listener_after_hello()
    b.feed(encode_frame(Open(1, "p")))
    events = b.receive_frames([Frame(Data(1, False), b"ok"), Frame(SMALL.hello())])
    assert events[0] == MessageReceived(1, b"ok")  # frames before the error keep their events
    assert isinstance(events[-1], ConnectionTerminated)
    assert isinstance(events[-1].error, ProtocolError) and "second Hello" in str(events[-1].error)
    assert b.state is State.ERROR and b.get_timer() is None
    for later in (encode_frame(Ping(1)), encode_frame(Data(1, False), b"x"), b""):
        with pytest.raises(ProtocolError, match="after a protocol error"):
            b.feed(later)
    with pytest.raises(ProtocolError, match="after a protocol error"):
        b.receive_frames([])


def test_decoder_error_enters_error_state() -> None:
    b = listener_after_hello()
    with pytest.raises(ProtocolError, match="malformed"):
        b.feed(b"\x00\x00\x00\x04\x01\x00\x01\xc1")
    assert b.state is State.ERROR
    with pytest.raises(ProtocolError, match="after a protocol error"):
        b.feed(encode_frame(Ping(2)))


def test_hello_deadline() -> None:
    _, b = timed_pair()
    assert b.get_timer() == 5
    assert b.handle_timer(4.9) == []
    [end] = b.handle_timer(5.0)
    assert isinstance(end, ConnectionTerminated) and isinstance(end.error, ProtocolError)
    assert "no Hello" in str(end.error) and b.get_timer() is None


def test_keepalive_ping_then_silence_kills() -> None:
    a, b = timed_pair()
    pump(a, b, 1.0)
    assert a.get_timer() == 11  # ping due 10 s after the last frame
    assert a.handle_timer(11.0) == []
    assert sent_messages(a) == [Ping(1)]
    assert a.get_timer() == 21  # next ping; the peer stays silent
    a.handle_timer(21.0)
    assert sent_messages(a) == [Ping(2)]
    assert a.get_timer() == 31
    [end] = a.handle_timer(31.0)
    assert isinstance(end, ConnectionTerminated) and not isinstance(end.error, ProtocolError)
    assert "silent for 30s" in str(end.error) and a.state is State.CLOSED


def test_answered_pings_keep_a_quiet_connection_alive() -> None:
    a, b = timed_pair(Timers(keepalive_interval=10, keepalive_timeout=30, idle_timeout=1e9))
    pump(a, b, 0.0)
    now = 0.0
    while now < 300:
        now = min(t for t in (a.get_timer(), b.get_timer()) if t is not None)
        for side in (a, b):
            assert side.handle_timer(now) == []
        pump(a, b, now)
    assert a.state is b.state is State.OPEN


def test_idle_retire_drain_and_close() -> None:
    a, b = timed_pair()
    pump(a, b, 0.0)
    sid = a.open_stream("p")
    pump(a, b, 1.0)
    now = 1.0
    for _ in range(20):  # an open stream: no idle retirement, however long
        now += 10
        a.handle_timer(now)
        b.handle_timer(now)
        pump(a, b, now)
    assert not a.goaway_sent and not b.goaway_sent
    a.close_stream(sid)
    b.close_stream(sid)
    pump(a, b, now)
    assert a.stream_count() == b.stream_count() == 0
    idle_at = now + 60
    while now < idle_at:
        now = min(t for t in (a.get_timer(), b.get_timer()) if t is not None)
        a.handle_timer(now)
        b.handle_timer(now)
        if a.goaway_sent:
            break
        pump(a, b, now)
    assert a.goaway_sent and now == idle_at  # retired exactly idle_timeout after the last stream
    events = pump(a, b, now)  # GoAway + drain Ping out, the Pong back
    assert GoAwayReceived("idle") in events
    assert a.get_timer() == now  # drained, no streams: end now
    [end] = a.handle_timer(now)
    assert isinstance(end, ConnectionTerminated) and "retired" in str(end.error)


def test_admission_deadline() -> None:
    timers = Timers(admission_timeout=3, keepalive_interval=10, keepalive_timeout=30)
    a, b = timed_pair(timers)
    pump(a, b, 0.5)
    assert b.get_timer() == 3
    [end] = b.handle_timer(3.0)
    assert isinstance(end, ConnectionTerminated) and "not admitted within 3s" in str(end.error)
    a, b = timed_pair(timers)
    pump(a, b, 0.5)
    b.mark_admitted()
    assert b.get_timer() == 10.5
    assert b.handle_timer(3.0) == []


def test_slowloris_is_a_protocol_error() -> None:
    a, b = timed_pair()
    pump(a, b, 0.0)
    frame = encode_frame(Ping(5))
    b.feed(frame[:3], 1.0)  # a frame begun, never finished
    b.handle_timer(10.0)
    [end] = b.handle_timer(30.0)
    assert isinstance(end, ConnectionTerminated) and isinstance(end.error, ProtocolError)
    assert "slowloris" in str(end.error) and b.state is State.ERROR


def test_connection_window_spans_streams() -> None:
    cw = Settings(max_frame_size=MIN_FRAME_SIZE, stream_window=64 * 1024,
                  max_message_size=48 * 1024, max_streams=4, connection_window=80 * 1024)
    a, b = Connection(Role.DIALER, cw), Connection(Role.LISTENER, cw)
    transfer(a, b)
    transfer(b, a)  # Hello, then the ConnectionCredit granting the window
    s1, s2 = a.open_stream("p"), a.open_stream("p")
    assert a.reserve(s1, 48 * 1024) and a.reserve(s1, 48 * 1024)  # idempotent for one message
    assert not a.reserve(s2, 48 * 1024)  # 32 KiB left on the connection
    assert a.reserve(s2, 32 * 1024)
    assert a.send_budget(s1) == MIN_FRAME_SIZE - DATA_OVERHEAD
    for sid, size in ((s1, 48 * 1024), (s2, 32 * 1024)):
        off = 0
        while off < size:
            n = min(a.send_budget(sid), size - off)
            a.send_data(sid, bytes(n), more=off + n < size)
            off += n
    assert a.send_budget(s1) == 0  # the connection window is spent
    got = [e for e in transfer(a, b) if isinstance(e, MessageReceived)]
    assert [len(e.data) for e in got] == [48 * 1024, 32 * 1024]
    b.consumed(s1, 48 * 1024)  # over a quarter of the connection window: credit goes back
    events = transfer(b, a)
    assert CreditAvailable(0) in events
    assert a.send_budget(s2) > 0


def test_peer_overrunning_the_connection_window() -> None:
    cw = Settings(max_frame_size=MIN_FRAME_SIZE, stream_window=64 * 1024,
                  max_message_size=48 * 1024, max_streams=4, connection_window=48 * 1024)
    b = Connection(Role.LISTENER, cw)
    b.feed(encode_frame(cw.hello()) + encode_frame(Open(1, "p")) + encode_frame(Open(3, "p")))
    frame = MIN_FRAME_SIZE - DATA_OVERHEAD
    b.feed(encode_frame(Data(1, True), bytes(frame)) * 3)  # 3 frames < 48 KiB on stream 1
    with pytest.raises(ProtocolError, match="connection window"):
        b.feed(encode_frame(Data(3, True), bytes(frame)))  # stream 3 has room, the connection not


def test_reset_and_dropped_data_free_the_connection_window() -> None:
    cw = Settings(max_frame_size=MIN_FRAME_SIZE, stream_window=64 * 1024,
                  max_message_size=48 * 1024, max_streams=4, connection_window=48 * 1024)
    b = Connection(Role.LISTENER, cw)
    b.feed(encode_frame(cw.hello()) + encode_frame(Open(1, "p")))
    frame = MIN_FRAME_SIZE - DATA_OVERHEAD
    b.feed(encode_frame(Data(1, True), bytes(frame)) * 2)  # half a message
    b.feed(encode_frame(Reset(1, "gone")))  # its partial bytes are dropped: window back
    b.data_to_send()
    b.feed(encode_frame(Open(3, "p")))
    b.feed(encode_frame(Data(1, False), bytes(frame)) * 2)  # racing the reset: dropped, freed
    out = sent_messages(b)
    assert any(isinstance(m, ConnectionCredit) for m in out)
    b.feed(encode_frame(Data(3, True), bytes(frame)) * 2)  # fits again


def test_control_frames_go_ahead_of_bulk() -> None:
    a, _ = connected()
    bulk, chat = a.open_stream("bulk"), a.open_stream("chat")
    a.data_to_send()
    big = MIN_FRAME_SIZE - DATA_OVERHEAD
    for _ in range(3):
        a.send_data(bulk, bytes(big), more=True)  # a multi-frame message: a bulk stream
    a.send_data(chat, b"hello")
    a.send_ping(9)
    a.close_stream(bulk)  # queued behind its own data
    control, rest = a.data_to_send_by_priority()
    first = FrameDecoder().feed(b"".join(bytes(x) for x in control))
    assert [f.message for f in first] == [Data(chat, False), Ping(9)]
    later = FrameDecoder(MIN_FRAME_SIZE).feed(b"".join(bytes(h) + bytes(p) for h, p in rest))
    assert [f.message for f in later] == [Data(bulk, True)] * 3 + [Close(bulk)]
    a.send_data(chat, b"x" * 8000)  # small (under SMALL_MESSAGE): still control
    control, rest = a.data_to_send_by_priority()
    assert control and not rest


def test_ping_flood_answers_stay_in_the_control_queue() -> None:
    b = listener_after_hello()
    b.feed(encode_frame(Ping(3)) * 1000)
    control, bulk = b.data_to_send_by_priority()
    assert len(control) == 1000 and not bulk
