from __future__ import annotations

from pathlib import Path

from tests.space.util import cluster, full_view
from tests.util import eventually


async def test_five_nodes_converge_and_share_an_op(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        first = await c.add()
        for _ in range(4):
            await c.add(seed=first)
        await eventually(lambda: full_view(c))
        op = await c.nodes[2].space.publish("test", b"hello")
        await eventually(lambda: all(n.space.ops("test") == [op] for n in c.nodes))
