from __future__ import annotations

import dataclasses

import msgspec
import pytest

from blobmesh.errors import ProtocolError
from blobmesh.space import Limits, Metrics, wire


def test_oversized_message_rejected_before_decoding() -> None:
    lim, m = dataclasses.replace(Limits(), max_message_bytes=1000), Metrics()
    # valid msgpack that would decode fine: only the size check can stop it
    raw = wire.encode(wire.PushOps(1, [b"x" * 2000], True))
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.decode_request(raw, lim, m)
    assert m["limit_message_bytes"] == 1 and m["malformed_messages"] == 0


def test_element_counts_are_bounded() -> None:
    lim, m = dataclasses.replace(Limits(), max_elements=10), Metrics()
    raw = wire.encode(wire.Fetch(1, [b"i"] * 11))
    with pytest.raises(ProtocolError, match="11 ids"):
        wire.decode_request(raw, lim, m)
    assert m["limit_message_elements"] == 1
    assert wire.decode_request(wire.encode(wire.Fetch(1, [b"i"] * 10)), lim, m).rid == 1


def test_garbage_and_wrong_family_are_protocol_errors() -> None:
    lim, m = Limits(), Metrics()
    for raw in (b"\xc1", msgspec.msgpack.encode(["nope", 1]), wire.encode(wire.Ack(1))):
        with pytest.raises(ProtocolError):
            wire.decode_request(raw, lim, m)
    assert m["malformed_messages"] == 3
