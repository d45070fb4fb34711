"""The dashboard's HTTP listener: the page, its event stream, and the node's JSON API.

One sampler task per node builds a view at most ``interval`` apart (4 per second by default)
and only while pages are open; every open page's stream sends the latest view when it is
ready for one, so a slow page skips views instead of queueing them.  A stream of one
distribution sends only the target rows that changed since its previous message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
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
        self._clients = 0
        self._view: dict[str, Any] = {}
        self._view_bytes = b""
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
        return web.json_response({**self._view, "fleet": self._fleet})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``view`` (node, distributions), ``fleet`` (members, at most
        once a second), ``log`` (events new to this stream) and, with ``?dist=HANDLE``,
        ``dist`` (that distribution's changed target rows and its throughput history)."""
        handle = request.query.get("dist", "")
        delta = TargetDelta(str(DistributionHandle.parse(handle))) if handle else None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self._clients += 1
        self._wake.set()
        if not self._view:  # the first page need not wait for the sampler
            await self._refresh(time.time())
            self._build(time.time())
        seen, last_event, fleet_seen, sent_at = -1, 0, -1, 0.0
        try:
            await resp.write(b"retry: 1000\n\n")
            while not self._closing:
                if self._version == seen:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), _KEEPALIVE)
                    if self._version == seen:
                        if time.monotonic() - sent_at >= _KEEPALIVE:
                            await resp.write(b": keepalive\n\n")
                            sent_at = time.monotonic()
                        continue
                seen = self._version
                message, last_event, fleet_seen = self._message(delta, last_event, fleet_seen)
                await resp.write(message)
                sent_at = time.monotonic()
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self._clients -= 1
        return resp

    def _message(self, delta: TargetDelta | None, last_event: int, fleet_seen: int
                 ) -> tuple[bytes, int, int]:
        """What one stream sends for the latest view: the view and the fleet if it changed
        (each encoded once for all streams), new log events, and the changes of the
        distribution it follows."""
        started = time.thread_time()
        chunks = [self._view_bytes]
        if self._fleet_version != fleet_seen:
            chunks.append(self._fleet_bytes)
        if self._events.last_seq > last_event:
            chunks.append(_sse("log", {"events": [
                e.to_json() for e in self._events.since(last_event)]}))
        if delta is not None and delta.handle in self._statuses:
            status = self._statuses[delta.handle]
            now = self._view["t"]
            chunks.append(_sse("dist", {
                "t": now, "handle": delta.handle, "summary": summarize(status, now),
                "targets": delta.changed(status["targets"]),
                "history": self._history.series(delta.handle)[-240:]}))
        self.cpu += time.thread_time() - started
        return b"".join(chunks), self._events.last_seq, self._fleet_version

    async def _sample_loop(self) -> None:
        while True:
            if self._clients == 0:
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.monotonic()
            # a failure is logged and counted by the owner, and the loop restarted
            await self._refresh(time.time())
            self._build(time.time())
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def _refresh(self, now: float) -> None:
        """What comes from the store (off the event loop, through ``store.aio``): at most
        every ``_STORE_EVERY`` seconds."""
        if now - self._store_at < _STORE_EVERY:
            return
        try:
            blobs = await self.node.store.aio.blobs()
            self._node_info = await self.node.describe()
        except StoreError as exc:
            log.warning("dashboard: store usage unavailable: %s", exc)
            return
        self._store_at = now
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
        if now - self._fleet_at >= _FLEET_EVERY:
            self._build_fleet(now, down, up_rate, down_rate)
        self._events.observe(now, self._members, statuses)
        self._history.record(now, rows)
        self._statuses = {s["handle"]: s for s in statuses}
        self._view = {
            "t": now, "node": {**self._node_info, "url": self.url, "blobs": self._blobs},
            "distributions": rows,
            "dashboard": {"clients": self._clients, "frames": self.frames, "cpu": self.cpu},
        }
        self._view_bytes = _sse("view", self._view)
        self.frames += 1
        self.cpu += time.thread_time() - started
        self._version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _build_fleet(self, now: float, down: dict[str, float], up_rate: float,
                     down_rate: float) -> None:
        me = self.node.identity.node_id
        store = self._node_info.get("store", {})
        fleet: list[dict[str, Any]] = []
        for p in self.node.space.peers(alive_only=False, include_self=True):
            is_me = p.node_id == me
            fleet.append({
                "node": str(p.node_id), "self": is_me, "addresses": list(p.addresses),
                "groups": sorted(p.groups), "capabilities": dict(p.capabilities),
                "liveness": liveness(p.alive, now if is_me else p.last_seen, now),
                "last_seen": now if is_me else p.last_seen,
                "store_bytes": store.get("bytes") if is_me else None,
                "store_blobs": store.get("blobs") if is_me else None,
                "up": up_rate if is_me else None,
                "down": down_rate if is_me else down.get(str(p.node_id), 0.0),
            })
        # this node first, then the members in trouble
        order = {"dead": 0, "suspect": 1, "alive": 2}
        fleet.sort(key=lambda m: (not m["self"], order[m["liveness"]], m["node"]))
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
