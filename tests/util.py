"""Helpers shared by the test suites."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 60,
                     interval: float = 0.05) -> None:
    """Poll ``check`` (state owned by other tasks or processes) until it holds."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await asyncio.sleep(interval)
