"""The control API of two in-process nodes on loopback: input validation, reuse of the active
distribution, pruning, node info, and ``/metrics`` as a stock Prometheus parses it."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from blobmesh import __version__
from blobmesh.collection import add_tree
from blobmesh.distribution.swarm import SwarmConfig
from blobmesh.errors import InvalidIdError
from blobmesh.node.client import ControlError, NodeClient
from blobmesh.node.control import MAX_STATS_NODES
from blobmesh.node.daemon import Node, NodeConfig
from blobmesh.node.metrics import MAX_DISTRIBUTIONS, MAX_TARGET_SERIES
from blobmesh.space.config import Timing
from blobmesh.transport.identity import Identity
from tests.util import eventually

FAST = Timing(gossip_interval=0.2, probe_interval=0.3, maintenance_interval=0.5)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    a = Node(NodeConfig(home=tmp_path / "a", timing=FAST, metrics_listen=("127.0.0.1", 0),
                        watch_interval=0.1))
    await a.start()
    # a slow target keeps distributions active while a test looks at them
    b = Node(NodeConfig(home=tmp_path / "b", timing=FAST, bootstrap=(a.ticket,),
                        groups=("edge",), swarm=SwarmConfig(download_rate=256 * 1024)))
    try:
        await b.start()
        await eventually(lambda: len(a.space.peers()) == 1 and len(b.space.peers()) == 1)
        yield a, b
    finally:
        await b.aclose()
        await a.aclose()


async def raw_post(home: Path, body: bytes) -> tuple[int, Any]:
    conn = aiohttp.UnixConnector(path=str(home / "control.sock"))
    async with aiohttp.ClientSession(connector=conn) as s, \
            s.post("http://node/v1/distributions", data=body,
                   headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize(("body", "message"), [
    (b"[1, 2]", "Expected `object`, got `array`"),
    (b'{"blob": "bm1x", "share_urls": "abc"}', "Expected `array`, got `str`"),
    (b'{"scope": "all"}', "missing required field `blob`"),
    (b'{"blob": 7}', "Expected `str`, got `int`"),
    (b'{"blob": "bm1x", "colour": "red"}', "unknown field `colour`"),
    (b"{not json", "malformed request body"),
    (b'{"blob": "bm1x"}', "malformed blob id"),
    (b'{"blob": "bm1' + b"a" * 52 + b'", "priority": "urgent"}', "priority"),
    (b'{"blob": "bm1' + b"a" * 52 + b'", "share_urls": ["abc"]}', "unsupported share URL"),
    (b'{"blob": "bm1' + b"a" * 52 + b'", "share_urls": ["http://"]}', "has no host"),
])
async def test_malformed_bodies_are_400_with_a_message(pair: tuple[Node, Node], body: bytes,
                                                      message: str) -> None:
    a, _ = pair
    status, data = await raw_post(a.config.home, body)
    assert status == 400, data
    assert message in data["error"] and data["type"]


async def test_same_blob_and_scope_returns_the_active_distribution(
        pair: tuple[Node, Node]) -> None:
    a, _ = pair
    blob = a.store.add_bytes(os.urandom(4 * 1024 * 1024)).blob_id
    async with NodeClient(a.config.home) as client:
        first, created = await client.distribute_or_join(str(blob), "group:edge", "normal")
        again, created_again = await client.distribute_or_join(str(blob), "group:edge", "low")
        other, created_other = await client.distribute_or_join(str(blob), "group:edge",
                                                               "normal", new=True)
        assert (created, created_again, created_other) == (True, False, True)
        assert again.handle == first.handle and other.handle != first.handle
        active = {str(s.handle) for s in await client.distributions(active=True)}
        assert active == {str(first.handle), str(other.handle)}
        assert await client.resolve_handle(str(first.handle)[:8]) == str(first.handle)
        await client.cancel(str(first.handle))
        await client.cancel(str(other.handle))
        await eventually(lambda: not a.distributions(active_only=True))
        assert sorted(await client.prune()) == sorted([str(first.handle), str(other.handle)])
        assert await client.distributions() == [] and await client.prune() == []
        # hidden from listings, not forgotten: a prefix still names it
        assert await client.resolve_handle(str(first.handle)[:8]) == str(first.handle)
        assert len(await client.distributions(pruned=True)) == 2
        handles = await client._request("GET", "/v1/distributions/handles")
        assert handles == {"handles": sorted([str(first.handle), str(other.handle)])}
        only = await client._request(
            "GET", f"/v1/distributions/handles?prefix={str(other.handle)[:12]}")
        assert other.handle != first.handle and str(other.handle) in only["handles"]
        assert await client._request("GET", "/v1/distributions/handles?prefix=d-zz") == {
            "handles": []}
        with pytest.raises(InvalidIdError, match="no distribution matches 'd-zz'"):
            await client.resolve_handle("zz")
        assert (await client.status(str(first.handle))).handle == first.handle
        with pytest.raises(ControlError, match="active must be true or false"):
            await client._request("GET", "/v1/distributions?active=maybe")


async def test_another_export_is_another_distribution(pair: tuple[Node, Node],
                                                      tmp_path: Path) -> None:
    """The active distribution is reused only for the same export: one exporting to
    ``v1`` would never write ``v2``, and a forced export is asked anew."""
    a, _ = pair
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "weights.bin").write_bytes(os.urandom(300_000))
    cid = str(add_tree(a.store, tree).collection_id)
    async with NodeClient(a.config.home) as client:
        v1, created = await client.distribute_or_join(cid, "group:edge", "normal", export="v1")
        same, created_same = await client.distribute_or_join(cid, "group:edge", "normal",
                                                             export="v1")
        v2, created_v2 = await client.distribute_or_join(cid, "group:edge", "normal",
                                                         export="v2")
        plain, created_plain = await client.distribute_or_join(cid, "group:edge", "normal")
        forced, created_forced = await client.distribute_or_join(
            cid, "group:edge", "normal", export="v1", export_force=True)
        assert (created, created_same, created_v2, created_plain, created_forced) == (
            True, False, True, True, True)
        assert same.handle == v1.handle
        assert len({v1.handle, v2.handle, plain.handle, forced.handle}) == 4
        assert (v1.export, v2.export, plain.export) == ("v1", "v2", "")
        shown = {s.handle: s.export for s in await client.distributions()}
        assert shown[v2.handle] == "v2" and shown[plain.handle] == ""
        for s in (v1, v2, plain, forced):
            await client.cancel(str(s.handle))


async def test_a_client_that_goes_away_logs_nothing(pair: tuple[Node, Node],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A ``--wait`` or ``status --follow`` stopped (Ctrl-C) as its event stream is being
    opened: the node has no one to answer and must log no error for it."""
    a, _ = pair
    blob = a.store.add_bytes(os.urandom(4 * 1024 * 1024)).blob_id
    async with NodeClient(a.config.home) as client:
        handle = str((await client.distribute(str(blob), "group:edge", "normal")).handle)
        for path in (f"/v1/distributions/{handle}/events", f"/v1/distributions/{handle}",
                     "/v1/node"):
            for _ in range(5):
                _, writer = await asyncio.open_unix_connection(
                    str(a.config.home / "control.sock"))
                writer.write(f"GET {path} HTTP/1.1\r\nHost: node\r\n\r\n".encode())
                await writer.drain()
                writer.close()  # gone before the answer
                await writer.wait_closed()
        assert (await client.node())["node"] == str(a.identity.node_id)  # still serving
        await asyncio.sleep(0.5)
        await client.cancel(handle)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_node_info(pair: tuple[Node, Node]) -> None:
    a, _ = pair
    async with NodeClient(a.config.home) as client:
        info = await client.node()
    assert info["node"] == str(a.identity.node_id) and info["ticket"] == str(a.ticket)
    assert info["version"] == __version__ and info["peers_alive"] == 1
    assert info["uptime_seconds"] >= 0 and info["store"] == {
        "blobs": 0, "partial_blobs": 0, "bytes": 0}


async def test_peer_stats_are_asked_of_the_members_named(pair: tuple[Node, Node]) -> None:
    a, b = pair
    b.store.add_bytes(os.urandom(5000))
    stranger = Identity.generate().node_id
    async with NodeClient(a.config.home) as client:
        first = await client.peer_stats([str(b.identity.node_id), str(stranger)])
        assert [r["node"] for r in first] == [str(b.identity.node_id), str(stranger)]
        assert first[0]["stats"] == "asking" and first[0]["store_bytes"] is None
        assert first[1]["stats"] is None  # not a member: never asked

        async def answered() -> bool:
            row = (await client.peer_stats([str(b.identity.node_id)]))[0]
            return bool(row["stats"] == "ok" and row["store_bytes"] == 5000 and
                        row["store_blobs"] == 1)
        await eventually(answered, 10)
        assert b.stats.answers >= 1
        for query, message in (("bm1nope", "node id"),
                               (",".join([str(stranger)] * (MAX_STATS_NODES + 1)), "at most")):
            with pytest.raises(ControlError, match=message):
                await client._request("GET", f"/v1/peers/stats?nodes={query}")


async def test_metrics_parse_for_a_stock_prometheus(pair: tuple[Node, Node]) -> None:
    a, b = pair
    blob = a.store.add_bytes(os.urandom(100_000)).blob_id
    handles = []
    async with NodeClient(a.config.home) as client:
        for _ in range(MAX_DISTRIBUTIONS + 3):  # more than get series
            handles.append(str((await client.distribute(str(blob), "all", "normal")).handle))
            await client.cancel(handles[-1])
        over_socket = await client.metrics()
    assert a.metrics_address is not None
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://{a.metrics_address}/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == {f.name for f in text_string_to_metric_families(over_socket)}
    for f in families.values():
        assert f.documentation and f.type in ("counter", "gauge"), f.name
        assert not f.name.startswith("blobmesh_shares_shares"), f.name
    assert "# HELP blobmesh_space_gossip_rounds_total" in text
    info = families["blobmesh_build_info"].samples[0]
    assert info.labels["version"] == __version__ and info.value == 1
    series = {s.labels["handle"] for s in families["blobmesh_distribution_bytes_done"].samples}
    assert len(series) == MAX_DISTRIBUTIONS and series <= set(handles)
    by_state = {s.labels["state"]: s.value for s in families["blobmesh_distributions"].samples}
    assert by_state["cancelled"] == MAX_DISTRIBUTIONS + 3
    per_target = families["blobmesh_distribution_target_bytes_done"].samples
    assert {s.labels["handle"] for s in per_target} == series  # the same bounded set
    assert len(per_target) == MAX_DISTRIBUTIONS <= MAX_TARGET_SERIES  # one target each
    assert {s.labels["target"] for s in per_target} == {str(b.identity.node_id)}
    # every HELP says what the family counts: none made up from its name
    assert [f.name for f in families.values()
            if f.documentation.startswith(("space counter", "share counter"))] == []


def test_per_distribution_and_per_target_series_are_bounded() -> None:
    """25 distributions of 30 targets: series for the 20 newest, 200 targets in all."""
    import time
    from types import SimpleNamespace

    from blobmesh.distribution.model import (
        DistributionHandle,
        DistributionState,
        DistributionStatus,
        Priority,
        Scope,
        TargetState,
        TargetStatus,
    )
    from blobmesh.hashing import hash_bytes
    from blobmesh.node.metrics import NodeCollector

    now = time.time()
    nodes = [Identity.generate().node_id for _ in range(30)]
    dists = [DistributionStatus(
        handle=DistributionHandle(f"d-{i:016x}"), blob_id=hash_bytes(b"%d" % i), size=1000,
        scope=Scope.all(), priority=Priority.parse("normal"), state=DistributionState.ACTIVE,
        targets=tuple(TargetStatus(n, TargetState.TRANSFERRING, bytes_done=i) for n in nodes),
        started=now + i) for i in range(MAX_DISTRIBUTIONS + 5)]
    node = SimpleNamespace(distribution=SimpleNamespace(distributions=lambda: dists))
    families = {f.name: f for f in NodeCollector(node, [])._distributions()}  # type: ignore[arg-type]
    per_dist = {s.labels["handle"] for s in families["blobmesh_distribution_bytes_done"].samples}
    assert per_dist == {str(d.handle) for d in dists[-MAX_DISTRIBUTIONS:]}  # the newest
    per_target = families["blobmesh_distribution_target_bytes_done"].samples
    assert len(per_target) == MAX_TARGET_SERIES
    assert {s.labels["handle"] for s in per_target} <= per_dist
