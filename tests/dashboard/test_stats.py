"""Other members' stats on the dashboard, sans I/O: whom to ask, which answers count."""

from __future__ import annotations

import random

import msgspec

from blobmesh.dashboard.stats import ASKING, OK, UNKNOWN, MemberStats
from blobmesh.node.stats import STATS_ASK, StatsAnswer, StatsAsk
from blobmesh.transport.identity import Identity, NodeId

A, B = Identity.generate().node_id, Identity.generate().node_id


def nonce_of(asks: list[tuple[NodeId, bytes]], node: NodeId) -> int:
    data = dict(asks)[node]
    assert data.startswith(STATS_ASK)
    return msgspec.msgpack.decode(data[len(STATS_ASK):], type=StatsAsk).nonce


def answer(nonce: int, store: int = 1000, blobs: int = 2, up: int = 0, down: int = 0) -> bytes:
    return msgspec.msgpack.encode(StatsAnswer(nonce, store, blobs, up, down))


def test_shown_members_are_asked_at_most_every_interval() -> None:
    s = MemberStats(every=2.0, rng=random.Random(1))
    assert [n for n, _ in s.due([A, B], 0.0)] == [A, B]
    assert s.due([A, B], 1.9) == []
    assert [n for n, _ in s.due([A], 2.0)] == [A]  # only those shown
    assert s.row(B, 2.0)["stats"] == ASKING
    assert s.row(Identity.generate().node_id, 2.0)["stats"] is None  # never shown


def test_an_answer_counts_once_and_only_for_its_request() -> None:
    s = MemberStats(every=2.0, rng=random.Random(2))
    asks = s.due([A, B], 0.0)
    na, nb = nonce_of(asks, A), nonce_of(asks, B)
    assert not s.answered(A, answer(nb), 0.1)  # another member's nonce
    assert not s.answered(Identity.generate().node_id, answer(na), 0.1)  # not asked
    assert s.answered(A, answer(na, store=5000, blobs=3), 0.2)
    assert not s.answered(A, answer(na, store=1), 0.3)  # a replay
    row = s.row(A, 0.3)
    assert (row["stats"], row["store_bytes"], row["store_blobs"]) == (OK, 5000, 3)
    assert row["up"] is None and row["stats_seen"] == 0.2  # one answer: no rate yet
    assert s.row(B, 0.3)["store_bytes"] is None


def test_garbage_answers_are_dropped() -> None:
    s = MemberStats(rng=random.Random(3))
    n = nonce_of(s.due([A], 0.0), A)
    garbage = [
        b"", b"\xc1", b"not msgpack at all",
        msgspec.msgpack.encode([n, -1, 0, 0, 0]),  # negative
        msgspec.msgpack.encode([n, 2**64 - 1, 0, 0, 0]),  # out of range
        msgspec.msgpack.encode([n, "1000", 0, 0, 0]),  # wrong type
        msgspec.msgpack.encode([n, 1.5, 0, 0, 0]),
        msgspec.msgpack.encode([n, 1000]),  # too short
        msgspec.msgpack.encode({"nonce": n, "store_bytes": 1}),
        answer(n) + b"x" * 100,  # too long
    ]
    for data in garbage:
        assert not s.answered(A, data, 0.1), data
    assert s.row(A, 0.1)["stats"] == ASKING
    assert s.row(A, 6.5)["stats"] == UNKNOWN and s.row(A, 6.5)["stats_seen"] is None


def test_rates_from_two_answers_and_staleness() -> None:
    s = MemberStats(every=2.0, stale_after=6.0, rng=random.Random(4))
    s.answered(A, answer(nonce_of(s.due([A], 0.0), A), up=1000, down=0), 0.0)
    s.answered(A, answer(nonce_of(s.due([A], 2.0), A), up=5000, down=2000), 2.0)
    row = s.row(A, 2.0)
    assert (row["up"], row["down"]) == (2000.0, 1000.0)
    # counters that went back (it restarted): no rate until the next answer
    s.answered(A, answer(nonce_of(s.due([A], 4.0), A), up=10, down=10), 4.0)
    assert s.row(A, 4.0)["up"] is None and s.row(A, 4.0)["stats"] == OK
    # it stops answering: unknown, last seen when it last answered
    s.due([A], 6.0)
    row = s.row(A, 10.5)
    assert row["stats"] == UNKNOWN and row["stats_seen"] == 4.0 and row["store_bytes"] is None


def test_members_no_longer_shown_are_forgotten() -> None:
    s = MemberStats(forget_after=60.0, rng=random.Random(5))
    s.due([A, B], 0.0)
    s.due([B], 61.0)
    assert s.row(A, 61.0)["stats"] is None and s.row(B, 61.0)["stats"] == ASKING
