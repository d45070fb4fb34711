"""A target that reaches no peer holding the blob loads it from the distribution's shares."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from blobmesh.distribution.model import Priority, TargetState
from blobmesh.distribution.service import DistributionConfig
from blobmesh.distribution.swarm import SwarmConfig
from blobmesh.node.daemon import Node, NodeConfig
from blobmesh.shares import ShareDir
from blobmesh.space.runner import FAST
from blobmesh.store import LeaseId
from tests.shares.conftest import run_nginx
from tests.util import eventually


async def test_target_falls_back_on_share_when_source_is_gone(tmp_path: Path) -> None:
    share_root = tmp_path / "share"
    share_root.mkdir()
    with run_nginx(share_root, tmp_path / "nginx") as url:
        source = Node(NodeConfig(home=tmp_path / "a", timing=FAST))
        await source.start()
        target = Node(NodeConfig(
            home=tmp_path / "b", timing=FAST, bootstrap=(source.ticket,),
            # a trickle from peers, and a short stall limit, so the share is what completes it
            swarm=SwarmConfig(download_rate=256 * 1024, stall_timeout=1.0),
            distribution=DistributionConfig(retry_backoff=0.2)))
        await target.start()
        try:
            data = os.urandom(6 * 1024 * 1024)
            blob = source.store.add_bytes(data).blob_id
            await asyncio.to_thread(ShareDir(share_root).share, source.store, blob)
            await eventually(lambda: bool(target.space.peers()), 10)
            handle = await source.distribution.distribute(blob, "all", Priority.HIGH,
                                                          share_urls=[url])
            await eventually(lambda: bool(target.distribution.distributions()), 10)
            await source.aclose(leave=False)  # the only peer holding the blob is gone
            await eventually(lambda: target.share_metrics.loads >= 1, 30)
            assert target.store.get_data(blob, LeaseId.new("t")) == data
            assert f"dist/{handle}" in [p.name for p in target.store.pins()]

            async def reported_complete() -> bool:
                mine = (await target.distribution.status(handle)).target(
                    target.identity.node_id)
                return mine is not None and mine.state is TargetState.COMPLETED

            await eventually(reported_complete, 10)
        finally:
            await target.aclose()
            await source.aclose()
