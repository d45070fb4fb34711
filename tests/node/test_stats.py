"""A node answers members' stats requests for itself, and only members', not too often."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgspec

from blobmesh.node.daemon import Node, NodeConfig
from blobmesh.node.stats import STATS_ANSWER, STATS_ASK, StatsAnswer, StatsAsk
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
