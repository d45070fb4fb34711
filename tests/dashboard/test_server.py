"""The dashboard's listener on a real node: assets, access, the event stream, pins."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from blobmesh.dashboard import read_url_file, serve_dashboard
from blobmesh.distribution.swarm import SwarmConfig
from blobmesh.node.daemon import Node, NodeConfig
from blobmesh.space.runner import FAST
from tests.util import eventually

MiB = 1024 * 1024


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with Node(NodeConfig(home=tmp_path / "n", timing=FAST,
                               services=(serve_dashboard(("127.0.0.1", 0)),))) as n:
        yield n


def url_of(node: Node) -> tuple[str, str]:
    info = read_url_file(node.config.home)
    assert info is not None
    return str(info["url"]).rstrip("/"), str(info["token"])


async def test_page_and_assets_with_types_and_caching(node: Node) -> None:
    url, _ = url_of(node)
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            assert r.headers["Cache-Control"] == "no-cache"
            page = await r.text()
        for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
            assert f"/static/{name}?v=" in page
            async with s.get(f"{url}/static/{name}") as r:
                assert r.status == 200 and r.content_type == kind
                assert "max-age" in r.headers["Cache-Control"]
        async with s.get(url + "/static/../auth.py") as r:
            assert r.status == 404


async def test_writes_need_same_origin_or_the_token_on_loopback(node: Node) -> None:
    url, token = url_of(node)
    bad = {"blob": "bm1nope", "scope": "all"}
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/distributions", json=bad) as r:
            assert r.status == 401
        async with s.post(url + "/v1/distributions", json=bad,
                          headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 401
        async with s.post(url + "/v1/distributions", json=bad, headers={"Origin": url}) as r:
            assert r.status == 400 and "bm1" in (await r.json())["error"]
        auth = {"Authorization": f"Bearer {token}"}
        async with s.post(url + "/v1/distributions", json=bad, headers=auth) as r:
            assert r.status == 400
        async with s.get(url + "/v1/node", headers=auth) as r:
            assert (await r.json())["node"] == str(node.identity.node_id)


async def test_pin_and_unpin(node: Node) -> None:
    url, token = url_of(node)
    blob = node.store.add_bytes(os.urandom(1000)).blob_id
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=auth) as s:
        async with s.post(url + "/v1/pins", json={"blob": str(blob), "name": "keep"}) as r:
            assert r.status == 201
        async with s.get(url + "/v1/pins") as r:
            assert [p["name"] for p in await r.json()] == ["keep"]
        async with s.post(url + "/v1/pins", json=["not", "an", "object"]) as r:
            assert r.status == 400
        async with s.delete(url + "/v1/pins/keep") as r:
            assert (await r.json())["blob"] == str(blob)
        async with s.delete(url + "/v1/pins/keep") as r:
            assert r.status == 400
    assert node.store.pins() == []


async def read_events(resp: aiohttp.ClientResponse, seconds: float) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    end = time.monotonic() + seconds
    event = ""
    while time.monotonic() < end:
        line = (await resp.content.readline()).decode().strip()
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[6:])))
    return out


async def test_stream_is_coalesced_to_a_few_views_per_second(node: Node) -> None:
    url, _ = url_of(node)
    async with aiohttp.ClientSession() as s, s.get(url + "/dash/v1/events") as r:
        assert r.content_type == "text/event-stream"
        events = await read_events(r, 2.0)
    views = [d for e, d in events if e == "view"]
    assert 3 <= len(views) <= 2 * 4 + 2
    assert views[0]["node"]["ticket"] == str(node.ticket)
    fleets = [d for e, d in events if e == "fleet"]
    assert 1 <= len(fleets) <= 2 + 1  # at most once a second
    assert fleets[0]["members"][0]["self"]


async def test_views_carry_only_what_changed(node: Node) -> None:
    url, _ = url_of(node)
    async with aiohttp.ClientSession() as s, s.get(url + "/dash/v1/events") as r:
        events = await read_events(r, 2.5)
    assert events[0][0] == "hello"
    views = [d for e, d in events if e == "view"]
    assert views[0]["node"]["ticket"] == str(node.ticket) and views[0]["order"] == []
    assert all("node" not in v and "order" not in v and v["distributions"] == []
               for v in views[1:])  # nothing changed since
    assert [v["v"] for v in views] == sorted(v["v"] for v in views)


async def test_a_view_follows_each_change_but_a_few_per_second_at_most(tmp_path: Path) -> None:
    async with Node(NodeConfig(home=tmp_path / "a", timing=FAST, services=(
            serve_dashboard(("127.0.0.1", 0)),))) as a, \
            Node(NodeConfig(home=tmp_path / "b", timing=FAST, bootstrap=(a.ticket,),
                            swarm=SwarmConfig(download_rate=4 * MiB))) as b:
        await eventually(lambda: a.space.is_alive(b.identity.node_id), 10)
        url, _ = url_of(a)
        blob = a.store.add_bytes(os.urandom(16 * MiB)).blob_id
        async with aiohttp.ClientSession() as s, s.get(url + "/dash/v1/events") as r:
            idle = [d for e, d in await read_events(r, 2.0) if e == "view"]
            handle = await a.distribution.distribute(blob, "all")
            busy = [d for e, d in await read_events(r, 2.0) if e == "view"]
            await a.distribution.cancel(handle)
        assert len(idle) <= 2 + 2  # the first, then one a second while nothing changes
        assert 6 <= len(busy) <= 2 * 4 + 1  # progress four times a second: a view each
        assert any(d["handle"] == str(handle) for v in busy for d in v["distributions"])


async def test_a_stream_says_which_fleet_page_it_shows(node: Node) -> None:
    url, _ = url_of(node)
    async with aiohttp.ClientSession() as s, s.get(url + "/dash/v1/events") as r:
        stream = (await read_events(r, 0.5))[0][1]["stream"]
        post = functools.partial(s.post, headers={"Origin": url})
        async with post(f"{url}/dash/v1/streams/{stream}", json={"fleet_page": 2}) as resp:
            assert resp.status == 200 and (await resp.json())["fleet_page"] == 2
        for bad in ({"fleet_page": -1}, {"fleet_page": "2"}, {"fleet_page": True}, [2]):
            async with post(f"{url}/dash/v1/streams/{stream}", json=bad) as resp:
                assert resp.status == 400, bad
        async with post(f"{url}/dash/v1/streams/nosuch", json={"fleet_page": 0}) as resp:
            assert resp.status == 404


NS = f"bmdash{uuid.uuid4().hex[:6]}"


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and ip")
def test_non_loopback_listener_without_token_is_401(tmp_path: Path) -> None:
    """A node listening on a non-loopback address (inside a namespace of our own)."""
    addr = "10.213.77.1"
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        def inside(*cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["ip", "netns", "exec", NS, *cmd], text=True,
                                  capture_output=True, timeout=30, **kw)

        inside("ip", "link", "set", "lo", "up", check=True)
        inside("ip", "addr", "add", f"{addr}/32", "dev", "lo", check=True)
        home = tmp_path / "wide"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", NS, sys.executable, "-m", "blobmesh.cli.main", "--home",
             str(home), "node", "run", "--listen", f"{addr}:0", "--http-listen", f"{addr}:0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline()
            info = read_url_file(home)
            assert info is not None and addr in info["url"]

            def curl(*args: str) -> str:
                return inside("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *args,
                              check=True).stdout

            assert curl(info["url"]) == "401"
            assert curl(info["url"] + "v1/node") == "401"
            assert curl("-H", "Authorization: Bearer wrong", info["url"] + "v1/node") == "401"
            assert curl("-H", f"Authorization: Bearer {info['token']}",
                        info["url"] + "v1/node") == "200"
            assert curl(f"{info['url']}?token={info['token']}") == "200"
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=15)
        assert f"?token={info['token']}" in err  # the node printed where to point a browser
        assert "Traceback" not in err
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False)
