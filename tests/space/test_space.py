"""The façade's handling of a full disk: typed errors, nothing half-stored, the node goes on."""

from __future__ import annotations

from pathlib import Path

import pytest

from blobmesh.errors import SpaceStorageError
from tests.space.test_store import full
from tests.space.util import cluster, full_view
from tests.util import eventually


async def test_publish_on_a_full_disk_raises_a_typed_error_and_the_space_goes_on(
        tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        a = await c.add()
        b = await c.add(seed=a)
        await eventually(lambda: full_view(c))
        sub = b.space.subscribe("test")
        full(b.space._db)  # the connection is private; the limit is SQLite's own
        with pytest.raises(SpaceStorageError):
            await b.space.publish("test", bytes(20_000))
        assert b.space.ops() == [] and b.space.metrics["ops_published"] == 0
        # a's op reaches b's full disk: b answers busy, keeps serving, and stores it once
        # there is room again (gossip offers it until then)
        op = await a.space.publish("test", bytes(20_000))
        await eventually(lambda: b.space.metrics["storage_errors"] > 0)
        assert b.space.ops() == []
        b.space._db.execute("PRAGMA max_page_count = 1073741823")
        await eventually(lambda: b.space.ops() == [op], within=5)
        assert await sub.__anext__() == op
        mine = await b.space.publish("test", b"after")
        await eventually(lambda: mine in a.space.ops())
