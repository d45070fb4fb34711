"""Helpers shared by the test suites."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path

from blobmesh.node.daemon import Node, NodeConfig
from tests.space.util import FAST


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
