"""The dashboard in a real browser (headless chromium) on a real 3-node fleet."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import urllib.request
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import msgspec
import pytest

from blobmesh.dashboard import read_url_file, serve_dashboard
from blobmesh.node.daemon import Node, NodeConfig
from blobmesh.node.fleet import Fleet
from blobmesh.node.stats import STATS_ANSWER, STATS_ASK, StatsAsk
from blobmesh.space.records import sign_record
from blobmesh.space.runner import FAST
from blobmesh.store import Store
from blobmesh.transport.identity import Identity, NodeId
from tests.dashboard.browser import ARTIFACTS, available, chromium, console_errors, wait_for
from tests.util import add_blob, eventually

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not available(), reason="needs chromium, chromedriver, selenium")]
MiB = 1024 * 1024


def api(url: str, token: str, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(url.rstrip("/") + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_fleet_distribution_cancel_and_a_dead_member_in_the_browser(fleet: Fleet) -> None:
    with socket.socket() as s:  # a fixed port, so the restarted node serves the same URL
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = fleet.add(groups=["lab"], extra=["--http-listen", f"127.0.0.1:{port}"])
    fleet.add(groups=["lab"], caps=["gpu=true"])
    slow = fleet.add(extra=["--download-rate", str(16 * MiB)])  # keeps a transfer cancellable
    fleet.start()
    asyncio.run(fleet.wait_converged(20))
    info = read_url_file(src.home)
    assert info is not None
    big, other = add_blob(src, 64 * MiB), add_blob(src, 64 * MiB)

    with chromium() as page:
        page.get(info["url"])
        js = page.execute_script

        # every member, with its groups and capabilities
        wait_for(lambda: js("return document.querySelectorAll('#fleet tbody tr').length") == 3,
                 15, "3 members")
        assert js("return document.querySelector('#ticket').value") == src.ticket
        members = js("return [...document.querySelectorAll('#fleet tbody tr')].map("
                     "r => [r.dataset.node, r.dataset.liveness, r.innerText])")
        assert {m[0] for m in members} == {n.node_id for n in fleet.nodes}
        assert all(m[1] == "alive" for m in members)
        assert any("gpu=true" in m[2] for m in members)

        # a bad request is refused and the page says why
        page.find_element("id", "start-blob").send_keys("bm1notablob")
        page.find_element("id", "start").click()
        wait_for(lambda: js("return !document.querySelector('#error').hidden && "
                            "document.querySelector('#error-text').textContent"), 5, "an error")
        assert "bm1" in js("return document.querySelector('#error-text').textContent")
        # chromium logs the refused request itself; that is the only console error allowed
        assert [e for e in console_errors(page) if "status of 400" not in e] == []

        # start 64 MiB to every other node from the page; it opens with per-target rows
        page.find_element("id", "start-blob").clear()
        page.find_element("id", "start-blob").send_keys(str(big))
        page.find_element("id", "start").click()
        handle = wait_for(lambda: js("return document.querySelector('#detail-handle')"
                                     ".textContent"), 10, "the new distribution opened")
        # while the slow target receives, its row names whom from (the source among them)
        # and how fast each sends
        wait_for(lambda: js("return [...document.querySelectorAll('#targets .trow')].some("
                            "r => r.dataset.sources.split(' ').includes(arguments[0]) && "
                            "/\\S{9} [0-9.]+ [KMG]iB\\/s/.test("
                            "r.querySelector('.sources').textContent))",
                            src.node_id), 20, "the source and its rate among a target's peers")
        row = f"#dists tr[data-handle='{handle}']"
        wait_for(lambda: js(f"const r = document.querySelector(\"{row}\"); return r && "
                            "r.dataset.state === 'completed' && "
                            "r.querySelector('.pct').textContent.trim() === '100.0 %'"),
                 40, "the distribution at 100 %")
        targets = wait_for(lambda: (lambda t: t if len(t) == 2 and all(
            s == "completed" for s in t.values()) else None)(js(
                "return Object.fromEntries([...document.querySelectorAll('#targets .trow')]"
                ".map(r => [r.dataset.node, r.dataset.state]))")), 10, "2 completed targets")
        assert set(targets) == {n.node_id for n in fleet.nodes[1:]}
        assert js("return window.__dash.dists") > 1  # the detail stream is live
        ARTIFACTS.mkdir(exist_ok=True)
        page.save_screenshot(str(ARTIFACTS / "dashboard.png"))

        # pin and unpin from the page
        page.find_element("id", "pin-blob").send_keys(str(big))
        page.find_element("id", "pin-name").send_keys("keep")
        page.find_element("id", "pin").click()
        pin_row = "#pins tr[data-pin='keep']"
        wait_for(lambda: js(f"return !!document.querySelector(\"{pin_row}\")"), 10, "the pin")
        with Store(src.home) as store:
            assert "keep" in [p.name for p in store.pins()]
        page.find_element("css selector", f"{pin_row} button.unpin").click()
        wait_for(lambda: js(f"return !document.querySelector(\"{pin_row}\")"), 10, "no pin")

        # another one, started through the JSON API, cancelled from the page
        second = api(info["url"], info["token"], "POST", "/v1/distributions",
                     {"blob": str(other), "scope": f"node:{slow.node_id}"})["handle"]
        button = f"#dists tr[data-handle='{second}'] button.cancel"
        wait_for(lambda: js(f"const b = document.querySelector(\"{button}\"); "
                            "return b && !b.disabled"), 10, "the second distribution")
        page.find_element("css selector", button).click()
        wait_for(lambda: js(f"const r = document.querySelector(\"#dists tr[data-handle="
                            f"'{second}']\"); return r && r.dataset.state === 'cancelled'"),
                 10, "the second distribution cancelled")
        assert api(info["url"], info["token"], "GET",
                   f"/v1/distributions/{second}")["state"] == "cancelled"

        # a member killed without goodbye turns suspect, then dead
        fleet.kill(slow)
        member = f"#fleet tr[data-node='{slow.node_id}']"
        wait_for(lambda: js(f"const r = document.querySelector(\"{member}\"); "
                            "return r && r.dataset.liveness !== 'alive'"), 15, "suspect")
        wait_for(lambda: js(f"return document.querySelector(\"{member}\")"
                            ".dataset.liveness === 'dead'"), 20, "dead")
        assert "is dead" in js("return document.querySelector('#events').innerText")
        page.save_screenshot(str(ARTIFACTS / "dashboard-dead-member.png"))
        assert console_errors(page) == []

        # the node goes away: the page says so; it comes back: the page reconnects by itself
        fleet.kill(src)
        wait_for(lambda: js("return !document.querySelector('#banner').hidden"), 10,
                 "the lost-node banner")
        fleet.start([src])
        wait_for(lambda: js("return document.querySelector('#banner').hidden && "
                            "document.querySelector('#ticket').value") == src.ticket, 20,
                 "the restarted node")


async def test_a_thousand_targets_stay_usable(tmp_path: Path) -> None:
    """1,000 members (signed records of nodes that never answer) and a distribution to all of
    them: the page draws a window of the target rows and a page of the fleet."""
    async with Node(NodeConfig(home=tmp_path / "n",
                               services=(serve_dashboard(("127.0.0.1", 0)),))) as node:
        now = int(time.time() * 1000)
        idents = [Identity.generate() for _ in range(1000)]
        node.space.add_records([sign_record(i, space=node.config.space, addresses=[],
                                            groups=["big"], capabilities={}, created_at=now,
                                            expires_at=now + 600_000) for i in idents])
        blob = node.store.add_bytes(os.urandom(MiB)).blob_id
        handle = str(await node.distribution.distribute(blob, "group:big"))
        last = max(str(i.node_id) for i in idents)
        info = read_url_file(node.config.home)
        assert info is not None

        def browse() -> None:
            with chromium() as page:
                page.get(info["url"])
                js = page.execute_script
                row = f"#dists tr[data-handle='{handle}']"
                wait_for(lambda: js(f"return !!document.querySelector(\"{row}\")"), 15,
                         "the distribution")
                page.find_element("css selector", row).click()
                wait_for(lambda: js("return document.querySelector('#targets-count')"
                                    ".textContent.startsWith('1000 targets')"), 15,
                         "1000 targets")
                assert js("return document.querySelectorAll('#targets .trow').length") <= 40
                js("const b = document.querySelector('#targets'); b.scrollTop = b.scrollHeight")
                wait_for(lambda: js(f"return !!document.querySelector(\"#targets .trow"
                                    f"[data-node='{last}']\")"), 5, "the last target")
                assert js("return document.querySelectorAll('#fleet tbody tr').length") == 50
                assert js("return document.querySelector('#fleet-range').textContent") == \
                    "1–50 of 1001"
                page.find_element("id", "fleet-next").click()
                wait_for(lambda: js("return document.querySelector('#fleet-range')"
                                    ".textContent") == "51–100 of 1001", 5, "the next page")
                # the node now asks this page's members for their stats (they never answer)
                wait_for(lambda: js("return [...document.querySelectorAll('#fleet tbody tr')]"
                                    ".every(r => r.dataset.stats === 'asking')"), 5,
                         "the second page's members asked")
                ARTIFACTS.mkdir(exist_ok=True)
                page.save_screenshot(str(ARTIFACTS / "dashboard-1000-targets.png"))
                draws, ms = js("return [window.__dash.draws, window.__dash.drawMs]")
                assert draws > 0 and ms / draws < 250  # a draw stays interactive (loaded CI)
                assert console_errors(page) == []

        await asyncio.to_thread(browse)


async def test_members_stats_honest_garbage_and_silent(tmp_path: Path) -> None:
    """Store usage of the other members, asked while the page is open: an honest member's
    shows; one answering garbage and one never answering show as unknown, and an honest one
    that goes quiet shows when it was last seen."""
    async with AsyncExitStack() as stack:
        dash = await stack.enter_async_context(Node(NodeConfig(
            home=tmp_path / "dash", timing=FAST, services=(serve_dashboard(("127.0.0.1", 0)),))))

        async def member(name: str) -> Node:
            return await stack.enter_async_context(Node(NodeConfig(
                home=tmp_path / name, timing=FAST, bootstrap=(dash.ticket,))))

        honest, garbage, silent = await member("honest"), await member("garbage"), \
            await member("silent")
        honest.store.add_bytes(os.urandom(3000))
        silent.space.notify_handler(STATS_ASK, None)

        async def lie(peer: NodeId, data: bytes) -> None:
            nonce = msgspec.msgpack.decode(data, type=StatsAsk).nonce
            for junk in ([nonce, -1, 1, 0, 0], [nonce, "9", 1, 0, 0], [nonce, 1.5, 1, 0, 0],
                         [nonce + 1, 10**15, 1, 0, 0], [nonce, 10**15], "lies"):
                await garbage.space.send_notify(peer, STATS_ANSWER + msgspec.msgpack.encode(junk))
            await garbage.space.send_notify(peer, STATS_ANSWER + b"\xc1" * 40)

        garbage.space.notify_handler(STATS_ASK, lie)
        await eventually(lambda: len(dash.space.peers()) == 3, 20)
        info = read_url_file(dash.config.home)
        assert info is not None
        cell = "const c = document.querySelector(\"#fleet tr[data-node='\" + arguments[0] + " \
               "\"'] td.store\"); return c && c.textContent"

        def browse() -> None:
            with chromium() as page:
                page.get(info["url"])
                js = page.execute_script
                wait_for(lambda: js(cell, str(honest.identity.node_id)) == "2.9 KiB (1)", 15,
                         "the honest member's store")
                wait_for(lambda: all(js(cell, str(n.identity.node_id)) ==
                                     "unknown (never answered)" for n in (garbage, silent)),
                         15, "unknown stats")
                assert js(cell, str(dash.identity.node_id)) != "—"  # this node's own
                honest.space.notify_handler(STATS_ASK, None)  # it goes quiet
                wait_for(lambda: js(cell, str(honest.identity.node_id)).startswith(
                    "unknown (last seen "), 15, "the quiet member's last answer")
                ARTIFACTS.mkdir(exist_ok=True)
                page.save_screenshot(str(ARTIFACTS / "dashboard-member-stats.png"))
                assert console_errors(page) == []

        await asyncio.to_thread(browse)
