"""The node's local control API: HTTP over a Unix socket in the node's home.

Only processes that can open ``HOME/control.sock`` (file mode 0600) can drive the node.
Routes (all JSON unless noted; the JSON naming scheme is in ``docs/distribution.md``):

* ``GET  /v1/node``                          node id, ticket, addresses, version, uptime, store
* ``GET  /v1/peers``                         peers the space knows
* ``GET  /v1/peers/stats?nodes=ID,...``       those members' store usage and rates (asked of
  them, at most every 2 s each: ``blobmesh.node.stats``)
* ``POST /v1/distributions``                 ``{"blob", "scope", "priority", "share_urls",
  "new", "export", "export_force"}``: 201 with a new distribution, or 200 with the active
  one for the same blob, scope and export (unless ``"new"`` or ``"export_force"``);
  ``export``: a collection's targets write the tree to ``HOME/exports/<export>``
* ``GET  /v1/distributions[?active=true][&pruned=true]``   distributions known here (pruned
  ones too with ``pruned=true``), newest first
* ``GET  /v1/distributions/handles[?prefix=P]``  ``{"handles": [...]}``: every handle known
  here, pruned ones too, that starts with ``P`` (no statuses: cheap with many targets)
* ``POST /v1/distributions/prune``           hide finished distributions from listings
* ``GET  /v1/distributions/{h}``             one status
* ``DELETE /v1/distributions/{h}``           cancel
* ``GET  /v1/distributions/{h}/events``      server-sent events: one status per change
* ``GET  /metrics``                          Prometheus text format

A malformed request is a 400 with ``{"error": message, "type": ...}``, an unknown handle or
blob a 404, a refused one a 409; never a 500 for anything a client sends.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from blobmesh.distribution.model import DistributionHandle
from blobmesh.errors import BlobmeshError, BlobNotFoundError, InvalidIdError
from blobmesh.hashing import BlobId
from blobmesh.node.codec import status_to_json
from blobmesh.shares.sources import open_source
from blobmesh.transport.identity import NodeId

if TYPE_CHECKING:
    from blobmesh.node.daemon import Node

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_STATS_NODES = 100  # members one stats request may name


class DistributeRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /v1/distributions``."""

    blob: str
    scope: str = "all"
    priority: str = "normal"
    share_urls: list[str] = msgspec.field(default_factory=list)
    new: bool = False
    export: str = ""  # a collection: targets export it to HOME/exports/<export>
    export_force: bool = False


class BadRequestError(BlobmeshError, ValueError):
    """A control request body or query that does not parse."""

    exit_code = 2


def _error(status: int, exc: BaseException) -> web.Response:
    return web.json_response({"error": str(exc), "type": type(exc).__name__}, status=status)


def _flag(request: web.Request, name: str) -> bool:
    """A ``true``/``false`` query parameter (absent: false)."""
    value = request.query.get(name, "false")
    if value not in ("true", "false"):
        raise BadRequestError(f"{name} must be true or false, not {value!r}")
    return value == "true"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    from blobmesh.distribution.model import ScopeError
    from blobmesh.distribution.service import UnknownDistributionError

    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except (InvalidIdError, ScopeError, ValueError, KeyError) as exc:
        if isinstance(exc, UnknownDistributionError | BlobNotFoundError):
            return _error(404, exc)
        return _error(400, exc)
    except BlobmeshError as exc:
        return _error(409, exc)
    except (ConnectionResetError, ConnectionAbortedError):
        # the client went away (a --wait stopped): nothing to answer, nothing to log;
        # raised, aiohttp would log it as an error with its traceback
        return web.Response(status=499)
    except Exception as exc:  # a bug: answered and logged, the node keeps serving
        log.exception("control request %s %s failed", request.method, request.path)
        return _error(500, exc)


def parse_body(raw: bytes, kind: type[DistributeRequest]) -> DistributeRequest:
    """Decode and type-check a JSON body, or raise :class:`BadRequestError`."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadRequestError(f"malformed request body: {exc}") from None


def serve_app(app: web.Application) -> web.AppRunner:
    """An ``AppRunner`` without access logs (the node logs what matters itself)."""
    return web.AppRunner(app, access_log=None)


class ControlServer:
    """Serves the control API of one node on its Unix socket.  TCP surfaces (``/metrics`` via
    :func:`metrics_app`, a dashboard) are apps of their own given to ``Node.serve_http``."""

    def __init__(self, node: Node, path: Path) -> None:
        self.node = node
        self.path = path
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware])
        app.add_routes(self.routes())
        return app

    def routes(self) -> list[web.RouteDef]:
        """The API's routes (to serve them in another app too, with ``error_middleware``)."""
        return [
            web.get("/v1/node", self.get_node),
            web.get("/v1/peers", self.get_peers),
            web.get("/v1/peers/stats", self.get_peer_stats),
            web.post("/v1/distributions", self.post_distribution),
            web.get("/v1/distributions", self.list_distributions),
            web.get("/v1/distributions/handles", self.distribution_handles),
            web.post("/v1/distributions/prune", self.prune_distributions),
            web.get("/v1/distributions/{handle}", self.get_distribution),
            web.delete("/v1/distributions/{handle}", self.delete_distribution),
            web.get("/v1/distributions/{handle}/events", self.distribution_events),
            web.get("/metrics", self.metrics),
        ]

    async def start(self) -> None:
        self._runner = serve_app(self.app())
        await self._runner.setup()
        self.path.unlink(missing_ok=True)  # a stale socket: the home lock says no node owns it
        old = os.umask(0o177)
        try:
            await web.UnixSite(self._runner, str(self.path)).start()
        finally:
            os.umask(old)

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.path.unlink(missing_ok=True)

    async def get_node(self, request: web.Request) -> web.Response:
        return web.json_response(await self.node.describe())

    async def get_peers(self, request: web.Request) -> web.Response:
        return web.json_response(self.node.peers_json())

    async def get_peer_stats(self, request: web.Request) -> web.Response:
        """``?nodes=ID,...``: those members are on a screen now, so they are asked for their
        stats (each at most every 2 s, whoever asks); their latest answers, in that order."""
        ids = [NodeId.parse(t) for t in request.query.get("nodes", "").split(",") if t]
        if len(ids) > MAX_STATS_NODES:
            raise BadRequestError(f"at most {MAX_STATS_NODES} nodes per stats request")
        now, me, stats = time.time(), self.node.identity.node_id, self.node.member_stats
        stats.ask([n for n in ids if n != me and self.node.space.is_member(n)], now)
        return web.json_response([{"node": str(n), **stats.row(n, now)} for n in ids])

    async def post_distribution(self, request: web.Request) -> web.Response:
        body = parse_body(await request.read(), DistributeRequest)
        blob_id = BlobId.parse(body.blob)
        for url in body.share_urls:  # refused now rather than failing on a target later
            await open_source(url).aclose()
        if not body.new and not body.export_force:  # (a forced export is asked anew)
            active = self.node.active_distribution(blob_id, body.scope, body.export)
            if active is not None:
                return web.json_response(status_to_json(active), status=200)
        handle = await self.node.distribution.distribute(
            blob_id, body.scope, body.priority, share_urls=body.share_urls,
            export=body.export, export_force=body.export_force)
        status = await self.node.distribution.status(handle)
        return web.json_response(status_to_json(status), status=201)

    async def list_distributions(self, request: web.Request) -> web.Response:
        return web.json_response([status_to_json(s) for s in self.node.distributions(
            active_only=_flag(request, "active"), with_pruned=_flag(request, "pruned"))])

    async def distribution_handles(self, request: web.Request) -> web.Response:
        prefix = request.query.get("prefix", "")
        return web.json_response({"handles": sorted(
            h for h in map(str, self.node.distribution.handles()) if h.startswith(prefix))})

    async def prune_distributions(self, request: web.Request) -> web.Response:
        return web.json_response({"pruned": self.node.prune_distributions()})

    async def get_distribution(self, request: web.Request) -> web.Response:
        handle = DistributionHandle.parse(request.match_info["handle"])
        return web.json_response(status_to_json(await self.node.distribution.status(handle)))

    async def delete_distribution(self, request: web.Request) -> web.Response:
        handle = DistributionHandle.parse(request.match_info["handle"])
        return web.json_response(status_to_json(await self.node.distribution.cancel(handle)))

    async def distribution_events(self, request: web.Request) -> web.StreamResponse:
        handle = DistributionHandle.parse(request.match_info["handle"])
        updates = self.node.distribution.subscribe_progress(handle)
        first = await anext(updates)  # raises for an unknown handle before headers go out
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        try:
            await resp.prepare(request)  # the client may be gone already
            await resp.write(_sse(status_to_json(first)))
            async for status in updates:
                await resp.write(_sse(status_to_json(status)))
            await resp.write_eof()
        except ConnectionResetError:
            pass  # a --wait client that stopped following; the distribution goes on
        return resp

    async def metrics(self, request: web.Request) -> web.Response:
        return await metrics_response(self.node)


async def metrics_response(node: Node) -> web.Response:
    from blobmesh.node.metrics import CONTENT_TYPE

    return web.Response(body=(await node.metrics_text()).encode(),
                        headers={"Content-Type": CONTENT_TYPE})


def metrics_app(node: Node) -> web.Application:
    """``/metrics`` alone, for a TCP listener a stock Prometheus scrapes."""
    async def metrics(request: web.Request) -> web.Response:
        return await metrics_response(node)

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics)])
    return app


def _sse(obj: dict[str, Any]) -> bytes:
    return f"event: status\ndata: {json.dumps(obj)}\n\n".encode()
