"""The driver: one timer for all cores, re-armed after pokes, actions executed in order."""

from __future__ import annotations

import asyncio

from blobmesh.space import Metrics
from blobmesh.space.driver import Driver


class Core:
    """Due at each of ``times`` (loop time) in turn; each firing yields one action."""

    def __init__(self, name: str, times: list[float]) -> None:
        self.name = name
        self.times = times
        self.fired: list[float] = []

    def get_timer(self) -> float | None:
        return self.times[0] if self.times else None

    def handle_timer(self, now: float) -> list[str]:
        if not self.times or now < self.times[0]:
            return []
        self.times.pop(0)
        self.fired.append(now)
        return [f"{self.name}@{len(self.fired)}"]


async def test_one_timer_runs_every_core_at_its_time() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    a, b = Core("a", [t0 + 0.02, t0 + 0.06]), Core("b", [t0 + 0.04])
    done: list[str] = []
    m = Metrics()
    driver = Driver([a, b], done.append, m)
    driver.start()
    await asyncio.sleep(0.1)
    assert done == ["a@1", "b@1", "a@2"]
    assert all(f >= w for f, w in zip(a.fired, [t0 + 0.02, t0 + 0.06], strict=True))
    # an event gives a core work sooner: a poke re-arms the one timer
    b.times.append(loop.time() + 0.01)
    a.times.append(loop.time() + 60.0)
    driver.poke()
    driver.poke()  # coalesced
    await asyncio.sleep(0.05)
    assert done[-1] == "b@2"
    driver.close()


async def test_a_failing_action_is_counted_and_the_timer_goes_on() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    core = Core("a", [t0, t0 + 0.01, t0 + 0.02])
    done: list[str] = []
    m = Metrics()

    def execute(action: str) -> None:
        if action == "a@1":
            raise RuntimeError("boom")
        done.append(action)

    driver = Driver([core], execute, m)
    driver.start()
    await asyncio.sleep(0.06)
    driver.close()
    assert done == ["a@2", "a@3"] and m["loop_errors"] == 1
