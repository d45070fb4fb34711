"""A node answers members' stats requests for itself, and only members', not too often; and
what it asks of the members its viewers show (sans I/O: whom to ask, which answers count)."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import msgspec

from blobmesh.node.daemon import Node, NodeConfig
from blobmesh.node.stats import (
    ASKING,
    OK,
    STATS_ANSWER,
    STATS_ASK,
    UNKNOWN,
    MemberStats,
    StatsAnswer,
    StatsAsk,
)
from blobmesh.space.runner import FAST
from blobmesh.transport.identity import Identity, NodeId
from tests.util import eventually


def ask(nonce: int) -> bytes:
    return STATS_ASK + msgspec.msgpack.encode(StatsAsk(nonce))


async def test_a_member_answers_with_its_store_and_counters(tmp_path: Path) -> None:
    async with Node(NodeConfig(home=tmp_path / "a", timing=FAST)) as a, \
            Node(NodeConfig(home=tmp_path / "b", timing=FAST, bootstrap=(a.ticket,))) as b:
        await eventually(lambda: a.space.is_member(b.identity.node_id), 10)
        b.store.add_bytes(os.urandom(3000))
        b.store.add_bytes(os.urandom(5000))
        got: asyncio.Queue[tuple[NodeId, StatsAnswer]] = asyncio.Queue()
        a.space.notify_handler(STATS_ANSWER, lambda peer, data: got.put_nowait(
            (peer, msgspec.msgpack.decode(data, type=StatsAnswer))))
        await a.space.send_notify(b.identity.node_id, ask(42))
        peer, answer = await asyncio.wait_for(got.get(), 5)
        assert peer == b.identity.node_id
        assert (answer.nonce, answer.store_bytes, answer.store_blobs) == (42, 8000, 2)
        assert (answer.uploaded, answer.downloaded) == (b.swarm.bytes_uploaded,
                                                        b.swarm.bytes_downloaded)
        # too soon again, or from a non-member: no answer
        await a.space.send_notify(b.identity.node_id, ask(43))
        await b.stats.on_ask(Identity.generate().node_id, msgspec.msgpack.encode(StatsAsk(1)))
        await asyncio.sleep(0.6)  # past min_gap
        assert got.empty() and b.stats.answers == 1
        await a.space.send_notify(b.identity.node_id, STATS_ASK + b"\xc1garbage")
        await a.space.send_notify(b.identity.node_id, ask(44))
        assert (await asyncio.wait_for(got.get(), 5))[1].nonce == 44
        assert b.stats.answers == 2


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
