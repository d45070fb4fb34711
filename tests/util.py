"""Helpers shared by the test suites."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path


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
