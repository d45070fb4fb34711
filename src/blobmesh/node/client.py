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
        data, _ = await self._request_status(method, path, body)
        return data

    async def _request_status(self, method: str, path: str, body: Any = None
                              ) -> tuple[Any, int]:
        assert self._session is not None
        try:
            async with self._session.request(method, f"http://node{path}", json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status >= 400:
                    raise ControlError(str(data.get("error", f"HTTP {resp.status}")),
                                       status=resp.status)
                return data, resp.status
        except aiohttp.ClientConnectionError as exc:
            raise NodeNotRunningError(
                f"the node of home {self.socket.parent} is not answering ({exc})") from exc

    async def node(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", "/v1/node")
        return result

    async def peers(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._request("GET", "/v1/peers")
        return result

    async def peer_stats(self, nodes: list[str]) -> list[dict[str, Any]]:
        """Those members' store usage and rates (``GET /v1/peers/stats``): asked of them now,
        so a first call finds them ``asking``."""
        result: list[dict[str, Any]] = await self._request(
            "GET", f"/v1/peers/stats?nodes={','.join(nodes)}")
        return result

    async def distribute(self, blob: str, scope: str, priority: str,
                         share_urls: list[str] | None = None, *, export: str = "",
                         export_force: bool = False) -> DistributionStatus:
        status, _ = await self.distribute_or_join(blob, scope, priority, share_urls,
                                                  export=export, export_force=export_force)
        return status

    async def distribute_or_join(self, blob: str, scope: str, priority: str,
                                 share_urls: list[str] | None = None, *, new: bool = False,
                                 export: str = "", export_force: bool = False
                                 ) -> tuple[DistributionStatus, bool]:
        """Start a distribution, or (unless ``new``) get the active one for the same blob and
        scope; the flag says whether a new one was created.  ``export``: a collection's
        targets write the tree to ``HOME/exports/<export>``."""
        data, code = await self._request_status("POST", "/v1/distributions", {
            "blob": blob, "scope": scope, "priority": priority,
            "share_urls": share_urls or [], "new": new, "export": export,
            "export_force": export_force})
        return status_from_json(data), code == 201

    async def distributions(self, *, active: bool = False,
                            pruned: bool = False) -> list[DistributionStatus]:
        """Distributions the node knows, newest first (pruned ones only with ``pruned``)."""
        query = f"?active={str(active).lower()}&pruned={str(pruned).lower()}"
        return [status_from_json(d)
                for d in await self._request("GET", f"/v1/distributions{query}")]

    async def prune(self) -> list[str]:
        """Hide finished distributions from listings; returns their handles."""
        result: list[str] = (await self._request("POST", "/v1/distributions/prune"))["pruned"]
        return result

    async def resolve_handle(self, text: str) -> str:
        """A full handle from a unique prefix (``d-3f2``, or ``3f2``) of a known one (pruned
        from listings or not: ``status`` of a pruned handle still answers)."""
        from urllib.parse import quote

        from blobmesh.node.ids import resolve_prefix

        text = text.strip()
        text = text if text.startswith("d-") else f"d-{text}"
        known = (await self._request("GET", "/v1/distributions/handles?prefix="
                                     + quote(text, safe="")))["handles"]
        return resolve_prefix(text, known, "distribution")

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
