"""Join tickets (version 2): the space name and its secret travel with the node's address."""

from __future__ import annotations

import msgspec
import pytest

from blobmesh.errors import InvalidIdError
from blobmesh.hashing.ids import encode_b32
from blobmesh.transport import Identity, Ticket

NODE = Identity.generate().node_id
BASE = Ticket.create(NODE, [("127.0.0.1", 4919)])


def test_join_ticket_round_trip_keeps_space_and_secret() -> None:
    closed = BASE.for_space("prod", b"s" * 32)
    parsed = Ticket.parse(str(closed))
    assert parsed == closed and parsed.space == "prod" and parsed.secret == b"s" * 32
    opened = Ticket.parse(str(BASE.for_space("lab", None)))
    assert opened.space == "lab" and opened.secret is None
    assert Ticket.parse(str(BASE)).space is None  # version 1 still parses
    assert "sss" not in repr(closed) and "closed" in repr(closed)


def test_join_ticket_bounds() -> None:
    with pytest.raises(InvalidIdError):
        BASE.for_space("x" * 257, None)
    with pytest.raises(InvalidIdError):
        BASE.for_space("s", b"k" * 257)
    raw = msgspec.msgpack.encode([2, NODE.digest, [["127.0.0.1", 1]], "s", b"k" * 257])
    with pytest.raises(InvalidIdError, match="malformed"):
        Ticket.parse("bmt1" + encode_b32(raw))
    raw = msgspec.msgpack.encode([3, NODE.digest, [["127.0.0.1", 1]]])
    with pytest.raises(InvalidIdError, match="unsupported ticket version 3"):
        Ticket.parse("bmt1" + encode_b32(raw))
