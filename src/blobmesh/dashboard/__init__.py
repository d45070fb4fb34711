"""The live web dashboard a node serves (``blobmesh node run --http-listen HOST:PORT``).

The page (plain HTML/CSS/JS in ``static/``, no build step) shows the fleet, every distribution
and every target, live through server-sent events, and acts through the node's JSON API.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from blobmesh.dashboard.auth import DashboardTokenError, Policy

if TYPE_CHECKING:
    from blobmesh.dashboard.server import Dashboard, read_url_file
    from blobmesh.node.daemon import Node

log = logging.getLogger(__name__)


def serve_dashboard(listen: tuple[str, int]) -> Callable[[Node], Awaitable[Dashboard]]:
    """A node service (``NodeConfig.services``) serving the dashboard on ``listen``; it logs
    the page's URL (with the token unless loopback) at INFO."""

    async def open_dashboard(node: Node) -> Dashboard:
        from blobmesh.dashboard.server import Dashboard

        dash = await Dashboard.open(node, listen)
        shown = dash.url if dash.policy.loopback_listener else f"{dash.url}?token={dash.token}"
        log.info("dashboard on %s", shown)
        return dash

    return open_dashboard


def __getattr__(name: str) -> Any:
    # the server (aiohttp, the node) loads on first use: every CLI command imports this
    # package for the dashboard's small helpers, and the server took 0.7 s of each start
    if name in ("Dashboard", "read_url_file"):
        from blobmesh.dashboard import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Dashboard", "DashboardTokenError", "Policy", "read_url_file", "serve_dashboard"]
