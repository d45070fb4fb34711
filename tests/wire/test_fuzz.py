"""Hypothesis fuzzing: whatever bytes arrive, the decoder and the state machine raise only
ProtocolError, terminate, and keep their memory bounded."""

from __future__ import annotations

import contextlib
import itertools
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobmesh.errors import ProtocolError
from blobmesh.wire import (
    MIN_FRAME_SIZE,
    Close,
    Connection,
    Credit,
    Data,
    FrameDecoder,
    GoAway,
    Message,
    Open,
    Ping,
    Pong,
    Reset,
    Role,
    Settings,
    encode_frame,
)

LIMITS = Settings(max_frame_size=MIN_FRAME_SIZE, stream_window=32 * 1024,
                  max_message_size=32 * 1024, max_streams=8)
# FUZZ_EXAMPLES=20000 for a long run; the default keeps the suite fast
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=2000,
                suppress_health_check=[HealthCheck.too_slow])

ids = st.integers(min_value=1, max_value=40)
small = st.integers(min_value=0, max_value=1 << 33)
text = st.text(max_size=20)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Open, ids, st.text(min_size=1, max_size=10)),
    st.builds(Data, ids, st.booleans()),
    st.builds(Close, ids),
    st.builds(Reset, ids, text),
    st.builds(Credit, ids, st.integers(min_value=0, max_value=0xFFFFFFFF)),
    st.builds(Ping, st.integers(min_value=0, max_value=(1 << 62) - 1)),
    st.builds(Pong, st.integers(min_value=0, max_value=(1 << 62) - 1)),
    st.builds(GoAway, text),
)


@st.composite
def frame_bytes(draw: st.DrawFn) -> bytes:
    msg = draw(messages)
    payload = draw(st.binary(max_size=3000)) if isinstance(msg, Data) else b""
    return encode_frame(msg, payload)


@st.composite
def sessions(draw: st.DrawFn) -> bytes:
    """A plausible byte stream (Hello then frames), then mutated."""
    wire = bytearray(encode_frame(LIMITS.hello()))
    for frame in draw(st.lists(frame_bytes(), max_size=30)):
        wire += frame
    for _ in range(draw(st.integers(0, 4))):
        if not wire:
            break
        pos = draw(st.integers(0, len(wire) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "flip":
            wire[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            wire[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del wire[pos:pos + draw(st.integers(1, 8))]
        else:
            del wire[pos:]
    return bytes(wire)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[i:j] for i, j in itertools.pairwise(points)]


def check_bounded(conn: Connection) -> None:
    assert conn.stream_count() <= 2 * LIMITS.max_streams
    for s in conn._streams.values():
        assert s.partial <= LIMITS.max_message_size
        assert s.recv_credit <= LIMITS.stream_window


@FUZZ
@given(st.binary(max_size=4096), st.lists(st.integers(0, 5000), max_size=8))
def test_decoder_random_bytes(data: bytes, cuts: list[int]) -> None:
    dec = FrameDecoder(MIN_FRAME_SIZE)
    try:
        for chunk in chunked(data, cuts):
            dec.feed(chunk)
            assert dec.buffered <= 4 + MIN_FRAME_SIZE
    except ProtocolError:
        pass


@FUZZ
@given(sessions(), st.lists(st.integers(0, 100_000), max_size=8),
       st.sampled_from([Role.DIALER, Role.LISTENER]))
def test_state_machine_mutated_sessions(wire: bytes, cuts: list[int], role: Role) -> None:
    conn = Connection(role, LIMITS)
    try:
        for chunk in chunked(wire, cuts):
            conn.feed(chunk)
            check_bounded(conn)
            conn.data_to_send()
    except ProtocolError:
        pass


@FUZZ
@given(st.lists(st.tuples(messages, st.binary(max_size=2000)), max_size=60),
       st.sampled_from([Role.DIALER, Role.LISTENER]))
def test_state_machine_valid_frames_any_order(frames: list[tuple[Message, bytes]],
                                              role: Role) -> None:
    """Well-formed frames in arbitrary order reach every state-machine check."""
    conn = Connection(role, LIMITS)
    try:
        conn.feed(encode_frame(LIMITS.hello()))
        for msg, payload in frames:
            conn.feed(encode_frame(msg, payload if isinstance(msg, Data) else b""))
            check_bounded(conn)
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(min_size=1, max_size=64))
def test_random_bytes_after_hello(junk: bytes) -> None:
    conn = Connection(Role.LISTENER, LIMITS)
    conn.feed(encode_frame(LIMITS.hello()))
    with contextlib.suppress(ProtocolError):
        conn.feed(junk)
