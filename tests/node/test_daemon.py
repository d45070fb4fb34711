"""The node daemon with real node processes: liveness while its store is held elsewhere."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobmesh.distribution.model import DistributionState
from blobmesh.node.client import NodeClient
from blobmesh.node.fleet import Fleet
from blobmesh.store import LeaseId, Store
from tests.store.helpers import start_worker

pytestmark = pytest.mark.slow
LOCK_SECONDS = 10.0


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path) as f:
        yield f


def _unresponsive_count(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("blobmesh_space_peers_unresponsive_total "):
            return float(line.split()[1])
    return 0.0


async def test_store_locked_by_another_process_stalls_only_store_work(fleet: Fleet) -> None:
    """A second process holds the target's store write lock for 10 s (as a GC or a big add
    in another process would): the target keeps answering on its event loop, no peer marks
    it unresponsive, and the distribution it was asked for completes once the lock goes."""
    src, dst = fleet.add(), fleet.add()
    fleet.start()
    await fleet.wait_converged(30)
    data = os.urandom(6 * 1024 * 1024)
    with Store(src.home) as store:
        blob = store.add_bytes(data).blob_id
    locker = start_worker("lock-store", str(dst.home), str(LOCK_SECONDS))
    assert locker.stdout is not None
    assert await asyncio.to_thread(locker.stdout.readline) == "locked\n"
    released = asyncio.create_task(asyncio.to_thread(locker.stdout.readline))
    t_locked = time.monotonic()
    async with NodeClient(src.home) as src_api, NodeClient(dst.home) as dst_api:
        handle = str((await src_api.distribute(str(blob), f"node:{dst.node_id}", "normal")).handle)
        worst = 0.0
        states = set()
        while not released.done():
            t = time.monotonic()
            await dst_api.peers()  # served by the target's event loop
            worst = max(worst, time.monotonic() - t)
            peers = await src_api.peers()
            assert [p["alive"] for p in peers if p["node"] == dst.node_id] == [True]
            states.add((await src_api.status(handle)).state)
            await asyncio.sleep(0.1)
        assert await released == "released\n" and locker.wait(10) == 0
        assert time.monotonic() - t_locked >= LOCK_SECONDS - 1
        # the lock did hold up the store work: nothing completed while it was held
        assert DistributionState.COMPLETED not in states
        assert worst < 0.5, f"the target's event loop stalled for {worst:.2f}s"
        deadline = time.monotonic() + 60
        while (await src_api.status(handle)).state is not DistributionState.COMPLETED:
            assert time.monotonic() < deadline, "the distribution did not resume"
            await asyncio.sleep(0.1)
        assert _unresponsive_count(await src_api.metrics()) == 0
        assert _unresponsive_count(await dst_api.metrics()) == 0
    with Store(dst.home) as store:
        assert store.get_data(blob, LeaseId.new("check")) == data
