"""Helpers shared by the test suites."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from blobmesh.distribution.model import DistributionStatus
from blobmesh.hashing import BlobId
from blobmesh.node.client import NodeClient
from blobmesh.node.daemon import Node, NodeConfig
from blobmesh.node.fleet import FleetNode
from blobmesh.store import LeaseId, Store
from blobmesh.transport import Identity
from blobmesh.transport.tls import make_context
from blobmesh.wire.connection import Settings
from blobmesh.wire.frames import encode_frame
from tests.space.util import FAST

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
"""For tests of a full disk: a small tmpfs of its own (see :func:`tmpfs`)."""


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float = 30.0,
                     step: float = 0.02) -> None:
    """Poll ``check`` (state owned by other tasks or processes) until it holds; fail the
    test after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > end:
            raise AssertionError(f"condition not reached within {within}s")
        await asyncio.sleep(step)


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``blobmesh --home HOME ARGS`` as a user would, output captured as text."""
    return subprocess.run([sys.executable, "-m", "blobmesh.cli.main", "--home", str(home),
                           *args], capture_output=True, text=True, timeout=120)


@asynccontextmanager
async def running_nodes(configs: Sequence[NodeConfig]) -> AsyncIterator[list[Node]]:
    """In-process nodes on the real transport (TLS on loopback) with the tests' fast space
    timing, each bootstrapped from the first; yielded once each sees every other alive."""
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for cfg in configs:
            node = Node(replace(cfg, timing=FAST,
                                bootstrap=(nodes[0].ticket,) if nodes else cfg.bootstrap))
            await node.start()
            stack.push_async_callback(node.aclose)
            nodes.append(node)
        await eventually(lambda: all(len(x.space.peers()) == len(nodes) - 1 for x in nodes), 20)
        yield nodes


@contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` MiB mounted at ``path`` (created, mode 0700 like a home; root
    only), unmounted afterwards."""
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def add_blob(node: FleetNode, size: int, data: bytes | None = None) -> BlobId:
    """Add ``data`` (``size`` random bytes by default) to a node's store."""
    with Store(node.home) as store:
        return store.add_bytes(os.urandom(size) if data is None else data).blob_id


def holds(node: FleetNode, blob: BlobId) -> bool:
    """Whether the node's store holds the whole blob and every byte of it verifies."""
    with Store(node.home) as store:
        if not store.has(blob):
            return False
        with store.get_reader(blob, LeaseId.new("test"), verify=True) as r:
            while r.read(4 << 20):
                pass
        return True


def flip_byte(path: Path, offset: int) -> None:
    """Rot one byte of a file in place (a disk that returns other data than was written)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


async def wait_done(node: FleetNode, handle: str, timeout: float = 60) -> DistributionStatus:
    """Follow a distribution through the node's control API until it ends; its last status."""
    async with NodeClient(node.home) as c:
        async def follow() -> DistributionStatus:
            last = await c.status(handle)
            async for s in c.events(handle):
                last = s
            return last

        return await asyncio.wait_for(follow(), timeout)


def stranger_connection(addr: tuple[str, int]) -> ssl.SSLSocket | None:
    """A TLS connection from a fresh identity that never proves the space secret: it sent the
    transport Hello and got one back (the node took it), or None if the node refused it."""
    try:
        ctx = make_context(Identity.generate(), server=False)
        sock = ctx.wrap_socket(socket.create_connection(addr, timeout=10))
        sock.settimeout(10)
        sock.sendall(encode_frame(Settings().hello()))
        if not sock.recv(1):
            sock.close()
            return None
        return sock
    except OSError:
        return None


def threads_and_rss(pid: int) -> tuple[int, int]:
    """A process's thread count and resident memory in bytes."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) * 1024
