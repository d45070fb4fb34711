"""The node's local control API: HTTP over a Unix socket in the node's home.

Only processes that can open ``HOME/control.sock`` (file mode 0600) can drive the node.
Routes (all JSON unless noted):

* ``GET  /v1/node``                          node id, ticket, listen addresses
* ``GET  /v1/peers``                         peers the space knows
* ``POST /v1/distributions``                 ``{"blob", "scope", "priority", "share_urls"}``
* ``GET  /v1/distributions``                 every distribution known here
* ``GET  /v1/distributions/{h}``             one status
* ``DELETE /v1/distributions/{h}``           cancel
* ``GET  /v1/distributions/{h}/events``      server-sent events: one status per change
* ``GET  /metrics``                          Prometheus text format
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from blobmesh.distribution.model import DistributionHandle
from blobmesh.errors import BlobmeshError, BlobNotFoundError, InvalidIdError
from blobmesh.hashing import BlobId
from blobmesh.node.codec import status_to_json

if TYPE_CHECKING:
    from blobmesh.node.daemon import Node

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, exc: BaseException) -> web.Response:
    return web.json_response({"error": str(exc), "type": type(exc).__name__}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    from blobmesh.distribution.model import ScopeError
    from blobmesh.distribution.service import UnknownDistributionError

    try:
        return await handler(request)
    except (InvalidIdError, ScopeError, ValueError, KeyError) as exc:
        if isinstance(exc, UnknownDistributionError | BlobNotFoundError):
            return _error(404, exc)
        return _error(400, exc)
    except BlobmeshError as exc:
        return _error(409, exc)


class ControlServer:
    """Serves the control API of one node."""

    def __init__(self, node: Node, path: Path) -> None:
        self.node = node
        self.path = path
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(middlewares=[_errors])
        app.add_routes([
            web.get("/v1/node", self.get_node),
            web.get("/v1/peers", self.get_peers),
            web.post("/v1/distributions", self.post_distribution),
            web.get("/v1/distributions", self.list_distributions),
            web.get("/v1/distributions/{handle}", self.get_distribution),
            web.delete("/v1/distributions/{handle}", self.delete_distribution),
            web.get("/v1/distributions/{handle}/events", self.distribution_events),
            web.get("/metrics", self.metrics),
        ])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.path.unlink(missing_ok=True)
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
        return web.json_response(self.node.describe())

    async def get_peers(self, request: web.Request) -> web.Response:
        return web.json_response(self.node.peers_json())

    async def post_distribution(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        blob_id = BlobId.parse(str(body.get("blob", "")))
        handle = await self.node.distribution.distribute(
            blob_id, str(body.get("scope", "all")), str(body.get("priority", "normal")),
            share_urls=[str(u) for u in body.get("share_urls", [])])
        status = await self.node.distribution.status(handle)
        return web.json_response(status_to_json(status), status=201)

    async def list_distributions(self, request: web.Request) -> web.Response:
        return web.json_response([status_to_json(s)
                                  for s in self.node.distribution.distributions()])

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
        await resp.prepare(request)
        await resp.write(_sse(status_to_json(first)))
        async for status in updates:
            await resp.write(_sse(status_to_json(status)))
        await resp.write_eof()
        return resp

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=await self.node.metrics_text(),
                            content_type="text/plain", charset="utf-8")


def _sse(obj: dict[str, Any]) -> bytes:
    return f"event: status\ndata: {json.dumps(obj)}\n\n".encode()
