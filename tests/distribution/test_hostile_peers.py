"""Hostile swarm members against in-process nodes on the real TLS transport.

Before (issue 10, real processes): a member that requests every piece and never reads blocked
all upload workers of the node it asked (another target's 16 MiB went from 0.5 s to failed
after 61 s); a member that accepts requests and never answers held 16 pieces for ~60 s, was
never banned, and its target reported "finished-with-failures" before completing at ~137 s.
Now the others' distributions finish in about their clean time and the bad member is banned,
with its reason, in the ban counter of ``/metrics``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import pytest

from blobmesh.distribution.model import DistributionHandle, DistributionState, TargetState
from blobmesh.distribution.scheduler import CLAIM_TTL
from blobmesh.distribution.swarm import BanKind, SwarmConfig
from blobmesh.hashing import BlobId
from blobmesh.node.client import NodeClient
from blobmesh.node.daemon import Node, NodeConfig
from blobmesh.store import LeaseId
from blobmesh.transport.identity import NodeId
from tests.distribution.hostile import hostile_node
from tests.space.util import FAST
from tests.util import eventually, running_nodes

pytestmark = pytest.mark.slow
MiB = 1024 * 1024


def add(node: Node, size: int) -> BlobId:
    return node.store.add_bytes(os.urandom(size)).blob_id


async def banned_metric(node: Node, kind: BanKind) -> float:
    """``blobmesh_swarm_peers_banned_total{reason=KIND}`` as the node's control API serves it."""
    async with NodeClient(node.config.home) as client:
        text = await client.metrics()
    found = re.findall(rf'^blobmesh_swarm_peers_banned_total\{{reason="{kind}"\}} (\S+)$',
                       text, re.M)
    assert len(found) == 1, text
    return float(found[0])


def hostile_config(tmp_path: Path, nodes: list[Node], mode: str) -> NodeConfig:
    return NodeConfig(home=tmp_path / mode, timing=FAST, bootstrap=(nodes[0].ticket,))


async def joined(nodes: list[Node], bad: Node) -> None:
    """Wait until every node sees the hostile member alive."""
    await eventually(lambda: all(n.space.is_member(bad.identity.node_id) and
                                 len(n.space.peers()) == len(nodes) for n in nodes), 20)


async def timed(node: Node, blob: BlobId, scope: str, real: list[Node], within: float
                ) -> tuple[float, list[tuple[TargetState, str]], DistributionHandle]:
    """Distribute from ``node``; seconds until every node of ``real`` completed, and every
    (state, reason) those showed meanwhile (the distribution must not end otherwise)."""
    ids = {n.identity.node_id for n in real}
    t0 = time.monotonic()
    handle = await node.distribution.distribute(blob, scope)
    seen: list[tuple[TargetState, str]] = []

    async def done() -> bool:
        s = await node.distribution.status(handle)
        seen.extend((t.state, t.reason) for t in s.targets if t.node in ids)
        assert s.state is DistributionState.ACTIVE or s.state is DistributionState.COMPLETED, s
        return sum(t.node in ids and t.state is TargetState.COMPLETED for t in s.targets) \
            == len(ids)

    await eventually(done, within, step=0.05)
    return time.monotonic() - t0, seen, handle


def verified(node: Node, blob: BlobId, like: Node) -> bool:
    lease = LeaseId.new("t")
    return node.store.get_data(blob, lease, verify=True) == like.store.get_data(blob, lease)


async def test_a_non_reading_member_blocks_no_upload_and_is_banned(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # a send_timeout shorter than the default 20 s, well above a distribution's time here
    swarm = SwarmConfig(send_timeout=12.0)
    configs = [NodeConfig(home=tmp_path / f"n{i}", swarm=swarm) for i in range(3)]
    async with running_nodes(configs) as (src, first, second):
        clean, _, _ = await timed(src, add(src, 8 * MiB), f"node:{second.identity.node_id}",
                                  [second], 20)
        async with hostile_node(hostile_config(tmp_path, [src], "non-reader"),
                                "non-reader") as (bad, hostile):
            await joined([src, first, second], bad)
            bad_id: NodeId = bad.identity.node_id
            assert await banned_metric(src, BanKind.NOT_READING) == 0
            # the first distribution it attacks: it asks the source for every piece, reads none
            attacked = add(src, 16 * MiB)
            await timed(src, attacked, f"node:{first.identity.node_id}", [first], 20)
            assert any(s.peer == src.identity.node_id for s in hostile.streams)
            # another target's distribution meanwhile (the non-reader asks the source for all
            # of it too, first): done before the source gave up on the non-reader, so its
            # sends blocked nobody else's; slower than clean only while its claims on the
            # pieces last (a seed gives a piece to one claimant at a time: CLAIM_TTL)
            took, _, _ = await timed(src, add(src, 8 * MiB),
                                     f"node:{second.identity.node_id}", [second], 20)
            assert not src.swarm.is_banned(attacked, bad_id)
            assert took <= CLAIM_TTL + 3 * clean + 4.0, (took, clean)
            # then the source bans it for the blob, with its reason, and counts it
            await eventually(lambda: src.swarm.is_banned(attacked, bad_id), 15)
            assert src.swarm.bans[BanKind.NOT_READING] >= 1
            assert "peer does not read" in src.swarm.ban_reasons[attacked][bad_id]
            assert await banned_metric(src, BanKind.NOT_READING) >= 1
    assert any(f"banning {bad_id.short()}" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info and r.levelno >= logging.WARNING]


async def test_a_black_hole_member_is_banned_and_the_others_finish_in_normal_time(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # the source at 8 MiB/s: 32 MiB take ~4 s, longer than three 1 s request deadlines
    quick = SwarmConfig(request_timeout=1.0)
    configs = [NodeConfig(home=tmp_path / "n0", swarm=SwarmConfig(upload_rate=8 * MiB)),
               *(NodeConfig(home=tmp_path / f"n{i}", swarm=quick) for i in (1, 2, 3))]
    async with running_nodes(configs) as nodes:
        src, targets = nodes[0], nodes[1:]
        clean, _, _ = await timed(src, add(src, 32 * MiB), "all", targets, 30)
        async with hostile_node(hostile_config(tmp_path, nodes, "black-hole"),
                                "black-hole") as (bad, hole):
            await joined(nodes, bad)
            bad_id: NodeId = bad.identity.node_id
            before = [await banned_metric(t, BanKind.UNRESPONSIVE) for t in targets]
            blob = add(src, 32 * MiB)
            # the black hole is a target too (scope all): it claims every piece, answers none
            took, seen, handle = await timed(src, blob, "all", targets, 30)
            assert hole.requests > 0  # it was asked, and held what it was asked
            assert all(verified(t, blob, src) for t in targets)
            assert took <= 1.5 * clean + 3.0, (took, clean)
            # no target failed or was given up on meanwhile ("finished-with-failures" before)
            assert all(state not in (TargetState.FAILED, TargetState.STALLED)
                       for state, _ in seen), seen
            banned_by = [t for t in targets if t.swarm.is_banned(blob, bad_id)]
            assert banned_by, "nobody banned the black hole"
            for t in banned_by:
                assert "answered none of its requests" in t.swarm.ban_reasons[blob][bad_id]
            after = [await banned_metric(t, BanKind.UNRESPONSIVE) for t in targets]
            assert sum(after) - sum(before) >= len(banned_by)
            # the reason showed in the targets' status while they went on
            assert any(state is TargetState.TRANSFERRING and f"last {bad_id.short()}" in reason
                       for state, reason in seen), seen
            hole_target = (await src.distribution.status(handle)).target(bad_id)
            assert hole_target is not None and hole_target.state is not TargetState.COMPLETED
    assert not [r for r in caplog.records if r.exc_info and r.levelno >= logging.WARNING]
