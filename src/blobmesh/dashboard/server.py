"""The dashboard's HTTP listener: the page, its event stream, and the node's JSON API.

One sampler task per node builds a view as soon as a distribution changes, at most
``interval`` apart (4 per second by default) and at least once a second, and only while pages
are open; every open page's stream sends what changed since the view it saw last when it is
ready for one, so a slow page skips views instead of queueing them.  While pages are open, the
members they show are asked for their stats (``blobmesh.node.stats``) every 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from blobmesh import __version__
from blobmesh.dashboard.auth import COOKIE, Policy, is_loopback, load_or_create_token
from blobmesh.dashboard.model import (
    EventLog,
    History,
    RateMeter,
    TargetDelta,
    VersionedRows,
    liveness,
    summarize,
    target_rates,
)
from blobmesh.distribution.model import DistributionHandle
from blobmesh.errors import StoreError
from blobmesh.hashing import BlobId
from blobmesh.node.codec import status_to_json
from blobmesh.node.control import ControlServer, error_middleware
from blobmesh.tasks import TaskOwner
from blobmesh.transport.ticket import format_address

if TYPE_CHECKING:
    from blobmesh.node.daemon import Node

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
URL_FILE = "dashboard.json"
_STATIC = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
_STORE_EVERY = 2.0  # seconds between store-usage queries (SQLite)
_FLEET_EVERY = 1.0  # seconds between fleet views (O(members), and liveness moves slowly)
_DISTRIBUTIONS_SHOWN = 200  # the newest ones; a long-lived node keeps every one it saw
_KEEPALIVE = 1.0  # a page hears from the node at least this often (it shows "lost" after 5 s)
FLEET_PAGE = 50  # members per page of the fleet table (app.js PAGE)
_HISTORY_SENT = 240  # points of a distribution's throughput a stream starts with


class _Stream:
    """One open page's event stream: what it has been sent, and which fleet page it shows."""

    def __init__(self) -> None:
        self.id = secrets.token_hex(8)
        self.fleet_page = 0
        self.seen = -1  # the view version it was last sent
        self.fleet_seen = -1
        self.last_event = 0
        self.history_after = float("-inf")


class Dashboard:
    """Serves the dashboard of ``node`` on ``listen``.  ``await Dashboard.open(node, listen)``"""

    def __init__(self, node: Node, listen: tuple[str, int], *, interval: float = 0.25) -> None:
        self.node = node
        self.listen = listen
        self.interval = interval
        self.token = load_or_create_token(node.config.home)
        self.policy = Policy(self.token, is_loopback(listen[0]))
        self.url = ""
        self._tasks = TaskOwner("dashboard")
        self._streams: dict[str, _Stream] = {}
        self._view: dict[str, Any] = {}
        self._rows = VersionedRows("handle")
        self._node_part: dict[str, Any] = {}
        self._node_changed = 0
        self._encoded: dict[int, bytes] = {}  # the view since version V, encoded once for all
        self._fleet: list[dict[str, Any]] = []
        self._fleet_bytes = b""
        self._fleet_at = 0.0
        self._fleet_version = 0
        self._members: dict[str, str] = {}
        self._statuses: dict[str, dict[str, Any]] = {}
        self._version = 0
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._closing = False
        self._events = EventLog()
        self._history = History()
        self._up, self._down = RateMeter(), RateMeter()
        self._store_at = 0.0
        self._refreshing = False
        self._node_info: dict[str, Any] = {}
        self._blobs: list[dict[str, Any]] = []
        self.frames = 0  # views built (for tests and benchmarks)
        self.cpu = 0.0  # CPU seconds spent building and encoding views (benchmarks)

    @classmethod
    async def open(cls, node: Node, listen: tuple[str, int]) -> Dashboard:
        dash = cls(node, listen)
        await dash.start()
        return dash

    async def start(self) -> None:
        app = web.Application(middlewares=[self._auth, error_middleware])
        app.add_routes([
            web.get("/", self.page),
            web.get("/static/{name}", self.static),
            web.get("/dash/v1/view", self.get_view),
            web.get("/dash/v1/events", self.events),
            web.post("/dash/v1/streams/{id}", self.post_stream),
            web.get("/v1/pins", self.list_pins),
            web.post("/v1/pins", self.post_pin),
            web.delete("/v1/pins/{name}", self.delete_pin),
            *ControlServer(self.node, self.node.config.home / "control.sock").routes(),
        ])
        bound = await self.node.serve_http(app, self.listen)  # served until the node stops
        host, port = bound.rsplit(":", 1)
        host = host.strip("[]")
        shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        self.url = f"http://{format_address((shown, int(port)))}/"
        self._tasks.spawn_restarting(self._sample_loop, name="sampler")
        path = self.node.config.home / URL_FILE
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": self.url, "token": self.token, "pid": os.getpid()}, f)

    @property
    def clients(self) -> int:
        return len(self._streams)

    async def aclose(self) -> None:
        self._closing = True
        self._changed.set()
        self._wake.set()
        await self._tasks.aclose()
        (self.node.config.home / URL_FILE).unlink(missing_ok=True)

    # --- access ----------------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        decision = self.policy.decide(request.method, request.headers, request.cookies,
                                      request.query)
        if not decision.allowed:
            return web.json_response({"error": decision.reason, "type": "Unauthorized"},
                                     status=401)
        resp = await handler(request)
        if decision.set_cookie and not resp.prepared:
            resp.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict")
        return resp

    # --- the page --------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        return self._asset("index.html", cache="no-cache")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        # assets are versioned by the package version in the page's URLs
        return self._asset(name, cache="public, max-age=3600")

    def _asset(self, name: str, cache: str) -> web.Response:
        data = resources.files("blobmesh.dashboard").joinpath("static", name).read_bytes()
        if name == "index.html":
            data = data.replace(b"{{version}}", __version__.encode())
        return web.Response(body=data, content_type=_STATIC[name], charset="utf-8",
                            headers={"Cache-Control": cache,
                                     "X-Content-Type-Options": "nosniff"})

    # --- views -----------------------------------------------------------------------------

    async def get_view(self, request: web.Request) -> web.Response:
        if not self._view:
            await self._refresh(time.time())
            self._build(time.time())
        return web.json_response({**self._view, "node": self._node_part,
                                  "distributions": self._rows.rows(), "fleet": self._fleet})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``hello`` (this stream's id), ``view`` (node, distributions:
        what changed since this stream's previous view), ``fleet`` (members, at most once a
        second), ``log`` (events new to this stream) and, with ``?dist=HANDLE``, ``dist``
        (that distribution's changed target rows and new throughput points)."""
        handle = request.query.get("dist", "")
        delta = TargetDelta(str(DistributionHandle.parse(handle))) if handle else None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        stream = _Stream()
        self._streams[stream.id] = stream
        self._wake.set()
        if not self._view:  # the first page need not wait for the sampler
            await self._refresh(time.time())
            self._build(time.time())
        sent_at = 0.0
        try:
            await resp.write(b"retry: 1000\n\n" + _sse("hello", {"stream": stream.id}))
            while not self._closing:
                if self._version == stream.seen:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), _KEEPALIVE)
                    if self._version == stream.seen:
                        if time.monotonic() - sent_at >= _KEEPALIVE:
                            await resp.write(b": keepalive\n\n")
                            sent_at = time.monotonic()
                        continue
                await resp.write(self._message(stream, delta))
                sent_at = time.monotonic()
        except ConnectionResetError:
            pass  # the page went away
        finally:
            del self._streams[stream.id]
        return resp

    async def post_stream(self, request: web.Request) -> web.Response:
        """``{"fleet_page": N}``: the page of the fleet a stream's page shows (whose members'
        stats are asked for)."""
        stream = self._streams.get(request.match_info["id"])
        if stream is None:
            raise web.HTTPNotFound()
        body = await request.json()
        page = body.get("fleet_page") if isinstance(body, dict) else None
        if not isinstance(page, int) or isinstance(page, bool) or not 0 <= page < 1 << 20:
            raise ValueError("expected a JSON object {\"fleet_page\": N}, N >= 0")
        stream.fleet_page = page
        self._fleet_at = 0.0  # ask its members at the next view
        self._wake.set()
        return web.json_response({"stream": stream.id, "fleet_page": page})

    def _message(self, stream: _Stream, delta: TargetDelta | None) -> bytes:
        """What one stream sends for the latest view: what changed since the view it saw
        (encoded once per version seen, for all streams at it), the fleet if it changed, new
        log events, and the changes of the distribution it follows."""
        started = time.thread_time()
        view = self._encoded.get(stream.seen)
        if view is None:
            rows, order = self._rows.since(stream.seen)
            part: dict[str, Any] = {**self._view, "distributions": rows}
            if order is not None:
                part["order"] = order
            if self._node_changed > stream.seen:
                part["node"] = self._node_part
            view = self._encoded[stream.seen] = _sse("view", part)
        chunks = [view]
        if self._fleet_version != stream.fleet_seen:
            chunks.append(self._fleet_bytes)
        if self._events.last_seq > stream.last_event:
            chunks.append(_sse("log", {"events": [
                e.to_json() for e in self._events.since(stream.last_event)]}))
        if delta is not None and delta.handle in self._statuses:
            status = self._statuses[delta.handle]
            now = self._view["t"]
            points = self._history.series(delta.handle, stream.history_after, _HISTORY_SENT)
            if points:
                stream.history_after = points[-1][0]
            chunks.append(_sse("dist", {
                "t": now, "handle": delta.handle, "summary": summarize(status, now),
                "targets": delta.changed(status["targets"]), "history": points}))
        stream.seen, stream.fleet_seen = self._version, self._fleet_version
        stream.last_event = self._events.last_seq
        self.cpu += time.thread_time() - started
        return b"".join(chunks)

    async def _sample_loop(self) -> None:
        while True:
            if not self._streams:
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.monotonic()
            self._wake.clear()
            self._refresh_soon(time.time())
            # a failure is logged and counted by the owner, and the loop restarted
            self._build(time.time())
            # the next view as soon as something changes (not sooner than ``interval`` after
            # this one), and at least once a second for the fleet and the clock
            waits = [asyncio.ensure_future(self.node.distribution.next_change()),
                     asyncio.ensure_future(self._wake.wait())]
            try:
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))
                left = _FLEET_EVERY - (time.monotonic() - started)
                await asyncio.wait(waits, timeout=max(0.0, left),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    def _refresh_soon(self, now: float) -> None:
        """Refresh from the store in the background (a slow store never delays a view); the
        view after it carries the news."""
        if now - self._store_at >= _STORE_EVERY and not self._refreshing:
            self._refreshing = True
            self._tasks.spawn(self._refresh_then_wake(now), name="store")

    async def _refresh_then_wake(self, now: float) -> None:
        try:
            await self._refresh(now)
        finally:
            self._refreshing = False
            self._wake.set()

    async def _refresh(self, now: float) -> None:
        """What comes from the store (off the event loop, through ``store.aio``): at most
        every ``_STORE_EVERY`` seconds."""
        if now - self._store_at < _STORE_EVERY:
            return
        try:
            blobs = await self.node.store.aio.blobs()
            info = await self.node.describe()
        except StoreError as exc:
            log.warning("dashboard: store usage unavailable: %s", exc)
            return
        self._store_at = now
        info.pop("uptime_seconds", None)  # the page counts it from started_at
        self._node_info = info
        self._blobs = [{"blob": str(b.blob_id), "size": b.size, "pins": list(b.pins)}
                       for b in blobs if b.complete][:200]

    def _build(self, now: float) -> None:
        started = time.thread_time()
        node = self.node
        statuses = [status_to_json(s)
                    for s in node.distribution.distributions()[:_DISTRIBUTIONS_SHOWN]]
        rows = [summarize(s, now) for s in statuses]
        down = target_rates(statuses)
        up_rate = self._up.update(now, node.swarm.bytes_uploaded)
        down_rate = self._down.update(now, node.swarm.bytes_downloaded)
        self._version += 1
        if now - self._fleet_at >= _FLEET_EVERY:
            self._build_fleet(now, down, up_rate, down_rate)
        self._events.observe(now, self._members, statuses)
        self._history.record(now, rows)
        self._statuses = {s["handle"]: s for s in statuses}
        self._rows.update(self._version, rows)
        part = {**self._node_info, "url": self.url, "blobs": self._blobs}
        if part != self._node_part:
            self._node_part, self._node_changed = part, self._version
        self._view = {"t": now, "v": self._version, "dashboard": {
            "clients": self.clients, "frames": self.frames, "cpu": self.cpu}}
        self._encoded = {}
        self.frames += 1
        self.cpu += time.thread_time() - started
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _build_fleet(self, now: float, down: dict[str, float], up_rate: float,
                     down_rate: float) -> None:
        me = self.node.identity.node_id
        store = self._node_info.get("store", {})
        peers = self.node.space.peers(alive_only=False, include_self=True)
        # this node first, then the members in trouble
        order = {"dead": 0, "suspect": 1, "alive": 2}
        members = sorted(((p, liveness(p.alive, now if p.node_id == me else p.last_seen, now))
                          for p in peers),
                         key=lambda m: (m[0].node_id != me, order[m[1]], str(m[0].node_id)))
        pages = {s.fleet_page for s in self._streams.values()}
        self.node.member_stats.ask([p.node_id for i, (p, _) in enumerate(members)
                                    if p.node_id != me and i // FLEET_PAGE in pages], now)
        fleet: list[dict[str, Any]] = []
        for p, alive in members:
            is_me = p.node_id == me
            if is_me:
                stats = {"store_bytes": store.get("bytes"), "store_blobs": store.get("blobs"),
                         "up": up_rate, "down": down_rate, "stats": "ok", "stats_seen": now}
            else:
                stats = self.node.member_stats.row(p.node_id, now)
                if stats["down"] is None:  # what it reports of the downloads from here
                    stats["down"] = down.get(str(p.node_id))
            fleet.append({
                "node": str(p.node_id), "self": is_me, "addresses": list(p.addresses),
                "groups": sorted(p.groups), "capabilities": dict(p.capabilities),
                "liveness": alive, "last_seen": now if is_me else p.last_seen, **stats,
            })
        self._fleet, self._fleet_at = fleet, now
        self._members = {m["node"]: m["liveness"] for m in fleet if not m["self"]}
        self._fleet_bytes = _sse("fleet", {"t": now, "members": fleet})
        self._fleet_version += 1

    # --- pins ------------------------------------------------------------------------------

    async def list_pins(self, request: web.Request) -> web.Response:
        pins = await self.node.store.aio.pins()
        return web.json_response([{"name": p.name, "blob": str(p.blob_id),
                                   "created": p.created} for p in pins])

    async def post_pin(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object {\"blob\", \"name\"}")
        blob_id = BlobId.parse(str(body.get("blob", "")))
        name = str(body.get("name", ""))
        await self.node.store.aio.pin(blob_id, name)
        self._store_at = 0.0  # show the new pin at the next view
        return web.json_response({"name": name, "blob": str(blob_id)}, status=201)

    async def delete_pin(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        blob_id = await self.node.store.aio.unpin(name)
        self._store_at = 0.0
        return web.json_response({"name": name, "blob": str(blob_id)})


def _sse(event: str, obj: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def read_url_file(home: Path) -> dict[str, Any] | None:
    """What a running node's dashboard wrote about itself (URL, token), if it runs one."""
    try:
        data: dict[str, Any] = json.loads((home / URL_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data
