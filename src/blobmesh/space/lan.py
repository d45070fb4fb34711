"""Optional LAN discovery over mDNS (``zeroconf``); off unless ``SpaceConfig.mdns``.

Each node announces ``_blobmesh._tcp.local.`` with its node id, addresses and a hash of the
space name (not the name itself); nodes of the same space found on the LAN become seeds.  What
mDNS says is only a hint: the space handshake and signed records decide admission.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import TYPE_CHECKING

from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from blobmesh.errors import InvalidIdError
from blobmesh.space.config import Seed
from blobmesh.transport.identity import NodeId
from blobmesh.transport.ticket import parse_address

if TYPE_CHECKING:
    from blobmesh.space.space import Space

SERVICE = "_blobmesh._tcp.local."


def space_tag(name: str) -> str:
    return hashlib.sha256(b"blobmesh/space/mdns\0" + name.encode()).hexdigest()[:16]


class LanDiscovery:
    """Announces this node and turns same-space nodes found on the LAN into seeds."""

    def __init__(self, space: Space) -> None:
        self._space = space
        self._tag = space_tag(space.config.name)
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        s = self._space
        port = 0
        with contextlib.suppress(InvalidIdError, IndexError):
            port = parse_address(s.config.addresses[0])[1]
        self._zc = AsyncZeroconf()
        info = AsyncServiceInfo(
            SERVICE, f"{s.node_id.short()}.{SERVICE}", port=port,
            properties={"node": str(s.node_id), "space": self._tag,
                        "addrs": ",".join(s.config.addresses)})
        await self._zc.async_register_service(info)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE,
                                            handlers=[self._on_change])

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Added:
            task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, name: str) -> None:
        info = AsyncServiceInfo(SERVICE, name)
        # the TXT record is all we use: the "resolved" flag also wants A records we don't send
        await info.async_request(zeroconf, 3000)
        if not info.properties:
            return
        props = {k.decode(): (v or b"").decode(errors="replace")
                 for k, v in info.properties.items()}
        if props.get("space") != self._tag:
            return
        try:
            node = NodeId.parse(props.get("node", ""))
            addrs = tuple(a for a in props.get("addrs", "").split(",") if a)[:16]
            for a in addrs:
                parse_address(a)
        except InvalidIdError:
            self._space.metrics.inc("lan_malformed")
            return
        if node != self._space.node_id:
            self._space.metrics.inc("lan_discovered")
            self._space.add_seed(Seed(node, addrs))

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_unregister_all_services()
            await self._zc.async_close()
