"""Subscriptions: a cursor resumes after the last op seen, replaying what was stored meanwhile."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from blobmesh.errors import SpaceLimitError
from blobmesh.space import Limits, Op, Subscription
from tests.space.util import cluster, config, full_view
from tests.util import eventually


async def take(sub: Subscription, n: int) -> list[Op]:
    return [await asyncio.wait_for(sub.__anext__(), 1) for _ in range(n)]


async def test_resuming_from_the_cursor_replays_the_gap_then_goes_live(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        node = await c.add(kinds=("test", "other"))
        s = node.space
        sub = s.subscribe("test")
        first = await s.publish("test", b"1")
        assert await take(sub, 1) == [first]
        sub.close()  # e.g. the consumer failed and restarts
        gap = [await s.publish("test", b"2"), await s.publish("other", b"x"),
               await s.publish("test", b"3")]
        again = s.subscribe("test", after=sub.cursor)
        assert await take(again, 2) == [gap[0], gap[2]]  # in arrival order, its kinds only
        live = await s.publish("test", b"4")
        assert await take(again, 1) == [live]
        assert again.cursor > sub.cursor
        with pytest.raises(TimeoutError):  # nothing twice
            await asyncio.wait_for(again.__anext__(), 0.1)
        again.close()


async def test_a_subscriber_that_fell_behind_loses_nothing_when_it_resumes(
        tmp_path: Path) -> None:
    limits = dataclasses.replace(Limits(), subscriber_queue=3)
    async with cluster(tmp_path) as c:
        node = await c.add(config(limits=limits))
        s = node.space
        sub = s.subscribe()
        ops = [await s.publish("test", b"%d" % i) for i in range(10)]
        got = await take(sub, 3)
        with pytest.raises(SpaceLimitError):
            await sub.__anext__()
        assert s.metrics["limit_subscriber"] == 1
        while len(got) < len(ops):  # each resumption replays a page of the gap
            sub = s.subscribe(after=sub.cursor)
            try:
                async for op in sub:
                    got.append(op)
                    if len(got) == len(ops):
                        break
            except SpaceLimitError:
                pass
        assert got == ops


async def test_ops_from_peers_are_replayed_too(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        a = await c.add()
        b = await c.add(seed=a)
        await eventually(lambda: full_view(c))
        cursor = b.space.subscribe("test").cursor
        op = await a.space.publish("test", b"p")
        await eventually(lambda: b.space.ops("test") == [op])
        assert await take(b.space.subscribe("test", after=cursor), 1) == [op]
