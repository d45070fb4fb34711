"""A client of a running node's control API (used by the CLI and the demo)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from blobmesh.distribution.model import DistributionStatus
from blobmesh.errors import BlobmeshError
from blobmesh.node.codec import status_from_json


class NodeNotRunningError(BlobmeshError):
    """No node answers on this home's control socket."""


class ControlError(BlobmeshError):
    """The node refused a control request."""


class NodeClient:
    """``async with NodeClient(home) as node: ...``"""

    def __init__(self, home: Path) -> None:
        self.socket = home / "control.sock"
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> NodeClient:
        if not self.socket.exists():
            raise NodeNotRunningError(
                f"no node is running for home {self.socket.parent} "
                f"(start one with: blobmesh --home {self.socket.parent} node run)")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket)),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        assert self._session is not None
        try:
            async with self._session.request(method, f"http://node{path}", json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status >= 400:
                    raise ControlError(str(data.get("error", f"HTTP {resp.status}")),
                                       status=resp.status)
                return data
        except aiohttp.ClientConnectionError as exc:
            raise NodeNotRunningError(
                f"the node of home {self.socket.parent} is not answering ({exc})") from exc

    async def node(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", "/v1/node")
        return result

    async def peers(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._request("GET", "/v1/peers")
        return result

    async def distribute(self, blob: str, scope: str, priority: str,
                         share_urls: list[str] | None = None, *, export: str = "",
                         export_force: bool = False) -> DistributionStatus:
        data = await self._request("POST", "/v1/distributions", {
            "blob": blob, "scope": scope, "priority": priority, "share_urls": share_urls or [],
            "export": export, "export_force": export_force})
        return status_from_json(data)

    async def distributions(self) -> list[DistributionStatus]:
        return [status_from_json(d) for d in await self._request("GET", "/v1/distributions")]

    async def status(self, handle: str) -> DistributionStatus:
        return status_from_json(await self._request("GET", f"/v1/distributions/{handle}"))

    async def cancel(self, handle: str) -> DistributionStatus:
        return status_from_json(await self._request("DELETE", f"/v1/distributions/{handle}"))

    async def events(self, handle: str) -> AsyncIterator[DistributionStatus]:
        """Status updates (server-sent events) until the distribution is done."""
        assert self._session is not None
        async with self._session.get(f"http://node/v1/distributions/{handle}/events") as resp:
            if resp.status >= 400:
                data = await resp.json(content_type=None)
                raise ControlError(str(data.get("error", f"HTTP {resp.status}")))
            async for line in resp.content:
                if line.startswith(b"data: "):
                    yield status_from_json(json.loads(line[6:]))

    async def metrics(self) -> str:
        assert self._session is not None
        async with self._session.get("http://node/metrics") as resp:
            return await resp.text()
