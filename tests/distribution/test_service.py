"""The distribution service over in-memory networks with real spaces and swarms."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from blobmesh.distribution.model import (
    DistributionHandle,
    DistributionState,
    Priority,
    ScopeError,
    TargetState,
)
from blobmesh.distribution.service import (
    DistributionService,
    DistributionTimeoutError,
    UnknownDistributionError,
)
from blobmesh.distribution.swarm import SwarmConfig, SwarmEngine
from blobmesh.errors import BlobNotFoundError
from blobmesh.hashing import BlobId
from blobmesh.space import Seed, Space, SpaceConfig
from blobmesh.store import Store
from blobmesh.transport.identity import Identity
from blobmesh.transport.memory import MemoryHub
from tests.space.util import FAST
from tests.util import eventually

MiB = 1024 * 1024


@dataclass
class Member:
    store: Store
    space: Space
    swarm: SwarmEngine
    dist: DistributionService


@asynccontextmanager
async def cluster(tmp_path: Path, groups: list[list[str]],
                  swarm_configs: dict[int, SwarmConfig] | None = None
                  ) -> AsyncIterator[list[Member]]:
    hub = MemoryHub()
    members: list[Member] = []
    async with AsyncExitStack() as stack:
        first: Identity | None = None
        for i, g in enumerate(groups):
            ident = Identity.generate()
            net = hub.node(ident.node_id)
            seeds = (Seed(first.node_id),) if first else ()
            first = first or ident
            store = stack.enter_context(Store(tmp_path / f"n{i}"))
            space = Space(SpaceConfig(name="t", groups=tuple(g), seeds=seeds, timing=FAST),
                          ident, net, tmp_path / f"n{i}" / "space.sqlite")
            swarm = SwarmEngine(store, net, (swarm_configs or {}).get(i, SwarmConfig()))
            dist = DistributionService(space, swarm)
            await space.start()
            await swarm.start()
            await space.join()
            await dist.start()
            stack.push_async_callback(space.aclose)
            stack.push_async_callback(swarm.aclose)
            stack.push_async_callback(dist.aclose)
            stack.push_async_callback(net.aclose)
            members.append(Member(store, space, swarm, dist))
        await eventually(lambda: all(len(m.space.peers()) == len(members) - 1
                                     for m in members), 10)
        yield members


def add(member: Member, size: int) -> BlobId:
    return member.store.add_bytes(os.urandom(size)).blob_id


async def test_wait_and_many_progress_subscribers(tmp_path: Path) -> None:
    async with cluster(tmp_path, [[], ["g"], ["g"]]) as (src, a, b):
        blob = add(src, 4 * MiB)
        handle = await src.dist.distribute(blob, "group:g", "high")

        async def collect() -> list[tuple[DistributionState, int]]:
            return [(s.state, s.bytes_done) async for s in src.dist.subscribe_progress(handle)]

        subs = [asyncio.create_task(collect()) for _ in range(3)]
        final = await src.dist.wait_for_completion(handle, 20)
        assert final.state is DistributionState.COMPLETED
        assert {t.node for t in final.targets} == {a.space.node_id, b.space.node_id}
        assert final.bytes_done == final.bytes_total == 8 * MiB
        for seen in await asyncio.gather(*subs):
            assert seen[-1] == (DistributionState.COMPLETED, 8 * MiB)
            done = [d for _, d in seen]
            assert done == sorted(done)  # progress never goes backwards
        assert a.store.has(blob) and b.store.has(blob)
        # cancelling after completion rolls nothing back
        after = await src.dist.cancel(handle)
        assert all(t.state is TargetState.COMPLETED for t in after.targets)
        assert a.store.has(blob)


async def test_progress_reports_the_targets_swarm_peers(tmp_path: Path) -> None:
    slow = {i: SwarmConfig(download_rate=4 * MiB) for i in (1, 2)}
    async with cluster(tmp_path, [[], [], []], slow) as (src, *_):
        handle = await src.dist.distribute(add(src, 16 * MiB), "all")

        async def both_peers_seen() -> bool:
            targets = (await src.dist.status(handle)).targets
            return all(t.state is TargetState.TRANSFERRING and t.peers == 2 for t in targets)

        await eventually(both_peers_seen, 10)  # the source and the other target
        await src.dist.cancel(handle)


async def test_wait_timeout_carries_status(tmp_path: Path) -> None:
    slow = {1: SwarmConfig(download_rate=2 * MiB)}
    async with cluster(tmp_path, [[], []], slow) as (src, dst):
        blob = add(src, 16 * MiB)
        handle = await src.dist.distribute(blob, "all", Priority.LOW)
        with pytest.raises(DistributionTimeoutError) as err:
            await src.dist.wait_for_completion(handle, 0.5)
        assert err.value.status.state is DistributionState.ACTIVE
        assert err.value.status.targets[0].node == dst.space.node_id
        cancelled = await src.dist.cancel(handle)
        assert cancelled.state is DistributionState.CANCELLED
        await eventually(lambda: not dst.swarm.downloading(), 5)  # the target stopped its download
        assert not dst.store.has(blob)


async def test_errors(tmp_path: Path) -> None:
    async with cluster(tmp_path, [[], ["g"]]) as (src, _):
        with pytest.raises(BlobNotFoundError):
            await src.dist.distribute(BlobId(b"\1" * 32), "all")
        blob = add(src, MiB)
        with pytest.raises(ScopeError, match="matches scope group:none"):
            await src.dist.distribute(blob, "group:none")
        with pytest.raises(ScopeError, match="does not know"):
            await src.dist.distribute(blob, "node:nd1" + "a" * 52)
        with pytest.raises(ScopeError, match="in capability predicate"):
            await src.dist.distribute(blob, "cap:gpu==")
        with pytest.raises(UnknownDistributionError):
            await src.dist.status(DistributionHandle.new())


async def test_malformed_distribution_ops_are_rejected(tmp_path: Path) -> None:
    from blobmesh.errors import InvalidOpError

    async with cluster(tmp_path, [[], []]) as (src, dst):
        with pytest.raises(InvalidOpError):
            await src.space.publish("dist/request", b"\x93garbage")
        assert dst.dist.distributions() == []
