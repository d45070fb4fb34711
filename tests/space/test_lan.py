from __future__ import annotations

from pathlib import Path

import pytest

from tests.space.util import cluster, config, full_view
from tests.util import eventually


async def test_lan_discovery_finds_same_space_nodes(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        try:
            a = await c.add(config(mdns=True, addresses=("127.0.0.1:1",)))
            b = await c.add(config(mdns=True, addresses=("127.0.0.1:2",)))
            other = await c.add(config(name="elsewhere", mdns=True, addresses=("127.0.0.1:3",)))
        except OSError as exc:  # no multicast-capable interface here
            pytest.skip(f"mDNS unavailable: {exc}")
        await eventually(lambda: full_view(c, [a, b]), within=8)
        assert other.space.peers() == []
        assert a.space.metrics["lan_discovered"] >= 1
