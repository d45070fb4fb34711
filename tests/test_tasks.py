"""The task owner: failures are logged and counted, restarts back off, start() orders start-up."""

from __future__ import annotations

import asyncio
import logging

import pytest

from blobmesh.tasks import TaskOwner, TaskStatus, failure_counts


async def _boom() -> None:
    raise ValueError("boom")


async def test_failure_is_logged_with_traceback_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    before = failure_counts().get("t1/boom", 0)
    async with TaskOwner("t1") as owner:
        task = owner.spawn(_boom(), name="boom")
        with caplog.at_level(logging.ERROR, logger="blobmesh.tasks"):
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0)
    assert owner.failures["t1/boom"] == 1
    assert failure_counts()["t1/boom"] == before + 1
    record = next(r for r in caplog.records if "t1/boom" in r.getMessage())
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)


async def test_cancellation_is_not_a_failure() -> None:
    owner = TaskOwner("t2")
    owner.spawn(asyncio.Event().wait(), name="waits")
    assert len(owner) == 1
    await owner.aclose()
    assert len(owner) == 0
    assert not owner.failures


async def test_fatal_policy_escalates() -> None:
    seen: list[BaseException] = []
    owner = TaskOwner("t3", on_fatal=seen.append)
    task = owner.spawn(_boom(), name="core", policy="fatal")
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    assert len(seen) == 1 and isinstance(seen[0], ValueError)
    await owner.aclose()


async def test_restarting_task_runs_again_until_it_returns() -> None:
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError(f"run {runs}")

    owner = TaskOwner("t4", restart_backoff=(0.001, 0.002))
    task = owner.spawn_restarting(flaky, name="flaky")
    await asyncio.wait_for(task, 5)
    assert runs == 3
    assert owner.failures["t4/flaky"] == 2
    await owner.aclose()


async def test_start_returns_what_the_task_reports_and_keeps_it_running() -> None:
    stop = asyncio.Event()

    async def server(task_status: TaskStatus[int]) -> None:
        task_status.started(4919)
        await stop.wait()

    async with TaskOwner("t5") as owner:
        port = await owner.start(server, name="server")
        assert port == 4919
        assert len(owner) == 1
        stop.set()


async def test_start_raises_when_the_task_fails_before_ready() -> None:
    async def broken(task_status: TaskStatus[int]) -> None:
        raise OSError("address in use")

    async def quits(task_status: TaskStatus[int]) -> None:
        return None

    async with TaskOwner("t6") as owner:
        with pytest.raises(OSError, match="address in use"):
            await owner.start(broken, name="broken")
        with pytest.raises(RuntimeError, match="before reporting"):
            await owner.start(quits, name="quits")


async def test_closed_owner_refuses_new_tasks() -> None:
    owner = TaskOwner("t7")
    await owner.aclose()
    assert owner.closing
    with pytest.raises(RuntimeError, match="closing"):
        owner.spawn(asyncio.sleep(0), name="late")
