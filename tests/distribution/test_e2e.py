"""End to end: real node processes on loopback distributing blobs through the swarm."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blobmesh.distribution.model import DistributionState, TargetState
from blobmesh.hashing import BlobId, hash_bytes
from blobmesh.node.client import ControlError, NodeClient
from blobmesh.node.fleet import Fleet
from blobmesh.store import LeaseId, Store
from tests.cli import schemas
from tests.util import add_blob, cli, eventually, holds, wait_done

pytestmark = pytest.mark.slow
MiB = 1024 * 1024


async def test_each_scope_kind_reaches_exactly_its_targets(fleet: Fleet) -> None:
    src = fleet.add()
    a = fleet.add(groups=["edge"], caps=["gpu=true", "arch=arm64"])
    b = fleet.add(groups=["core"], caps=["gpu=false", "mem_gb=64"])
    c = fleet.add(groups=["edge"], caps=["mem_gb=8", "arch=amd64"])
    fleet.start()
    await fleet.wait_converged(20)
    cases = {
        "group:edge": {a, c},
        "cap:mem_gb>=16": {b},
        f"node:{b.node_id},{c.node_id}": {b, c},
        "cap:arch in [arm64,amd64]": {a, c},
        "all": {a, b, c},
    }
    started = {}
    async with NodeClient(src.home) as client:
        for scope in cases:
            blob = add_blob(src, 3 * MiB + 11)
            status = await client.distribute(str(blob), scope, "normal")
            started[scope] = (blob, str(status.handle))
    for scope, want in cases.items():
        blob, handle = started[scope]
        final = await wait_done(src, handle)
        assert final.state is DistributionState.COMPLETED, scope
        assert {str(t.node) for t in final.targets} == {n.node_id for n in want}, scope
        for node in (a, b, c):
            assert holds(node, blob) == (node in want), (scope, node.index)


async def test_bad_requests_get_clear_errors(fleet: Fleet) -> None:
    src = fleet.add()
    fleet.add(groups=["g"])
    fleet.start()
    await fleet.wait_converged(20)
    blob = add_blob(src, MiB)
    async with NodeClient(src.home) as client:
        with pytest.raises(ControlError, match=r"not .*in this node's store"):
            await client.distribute("bm1" + "a" * 52, "all", "normal")
        with pytest.raises(ControlError, match="no node other than this one matches"):
            await client.distribute(str(blob), "group:nobody", "normal")
        with pytest.raises(ControlError, match="unknown distribution"):
            await client.status("d-0000000000000000")
    r = cli(src.home, "distribute", str(blob), "--to", "cap:mem_gb>>3")
    assert r.returncode == 2
    assert r.stderr.startswith("blobmesh: error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli(src.home, "distribute", str(blob), "--to", "sideways")
    assert r.returncode == 2 and "malformed scope" in r.stderr


async def test_cancel_and_wait_timeout(fleet: Fleet) -> None:
    src = fleet.add()
    slow = fleet.add(extra=["--download-rate", str(MiB)])  # 40 s: time for several CLI runs
    fleet.start()
    await fleet.wait_converged(20)
    blob = add_blob(src, 40 * MiB)
    r = cli(src.home, "distribute", str(blob), "--to", "all", "--wait", "--timeout", "1")
    assert r.returncode != 0
    assert "not finished after 1.0s" in r.stderr and "Traceback" not in r.stderr
    assert "goes on (follow it with: blobmesh status d-" in r.stderr
    # the same blob and scope again: the active distribution, its status on stdout at timeout
    r = cli(src.home, "distribute", str(blob)[:12], "--to", "all", "--wait", "--timeout", "1",
            "--json")
    assert r.returncode == 1 and "not finished after 1.0s" in r.stderr
    waited = schemas.check(json.loads(r.stdout), schemas.Status)
    assert waited.state == "active" and waited.totals.completed == 0
    r = cli(src.home, "distribute", str(blob), "--to", "all", "--timeout", "-1")
    assert r.returncode == 2 and "must be greater than 0" in r.stderr
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "blobmesh.cli.main", "--home", str(src.home), "status",
        waited.handle[:6], "--follow", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert follower.stderr is not None
        first = await asyncio.wait_for(follower.stderr.readline(), 60)
        assert first.decode().startswith(f"following {waited.handle}; Ctrl-C stops following")
        follower.send_signal(signal.SIGINT)  # Ctrl-C
        _, raw_err = await asyncio.wait_for(follower.communicate(), 30)
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()
    err = raw_err.decode()
    assert follower.returncode == 130, err
    assert f"stopped following; distribution {waited.handle} goes on" in err
    async with NodeClient(src.home) as client:
        assert [str(d.handle) for d in await client.distributions()] == [waited.handle]
        handle = str((await client.distributions())[0].handle)
        status = await client.cancel(handle)
        assert status.state is DistributionState.CANCELLED
        assert status.targets[0].state is TargetState.CANCELLED
        assert status.targets[0].rate == 0.0  # a cancelled target moves nothing any more
        final = await wait_done(src, handle, timeout=10)
        assert final.state is DistributionState.CANCELLED
    again = cli(src.home, "cancel", handle[:8], "--json")  # idempotent, by prefix
    assert schemas.check(json.loads(again.stdout), schemas.Status).state == "cancelled"
    await asyncio.sleep(1.5)
    with Store(slow.home) as store:
        assert not store.has(blob)
        before = store.info(blob).pieces_present
    await asyncio.sleep(1.5)
    with Store(slow.home) as store:
        assert store.info(blob).pieces_present == before  # nothing moves after cancel
        assert store.pins() == []  # and the partial copy is left to GC


async def test_late_joiner_and_source_death(fleet: Fleet) -> None:
    src = fleet.add()
    fast = fleet.add(groups=["g"])
    slow = fleet.add(groups=["g"], extra=["--download-rate", str(6 * MiB)])
    fleet.start()
    await fleet.wait_converged(20)
    blob = add_blob(src, 24 * MiB)
    async with NodeClient(src.home) as client:
        handle = str((await client.distribute(str(blob), "group:g", "normal")).handle)

        async def one_completed() -> bool:
            return (await client.status(handle)).completed >= 1

        await eventually(one_completed)
    assert holds(fast, blob) and not holds(slow, blob)
    fleet.kill(src)  # the rest must come from the target that already holds every piece
    late = fleet.add(groups=["g"])
    fleet.start([late])

    async def both_hold() -> bool:
        return holds(slow, blob) and holds(late, blob)

    await eventually(both_hold)


async def test_high_priority_overtakes_low(fleet: Fleet) -> None:
    src = fleet.add()
    dst = fleet.add(extra=["--download-rate", str(8 * MiB)])
    fleet.start()
    await fleet.wait_converged(20)
    big = add_blob(src, 48 * MiB)
    small = add_blob(src, 4 * MiB)
    async with NodeClient(src.home) as client:
        low = str((await client.distribute(str(big), "all", "low")).handle)
        await asyncio.sleep(0.5)
        high = str((await client.distribute(str(small), "all", "critical")).handle)
        high_done = await wait_done(src, high)
        low_now = await client.status(low)
    assert high_done.state is DistributionState.COMPLETED
    assert low_now.state is DistributionState.ACTIVE  # the big one was overtaken
    final = await wait_done(src, low, timeout=90)
    assert final.state is DistributionState.COMPLETED and holds(dst, big)


async def test_killed_target_resumes_when_it_returns(fleet: Fleet) -> None:
    src = fleet.add()
    dst = fleet.add(extra=["--download-rate", str(8 * MiB)])
    fleet.start()
    await fleet.wait_converged(20)
    blob = add_blob(src, 32 * MiB)
    async with NodeClient(src.home) as client:
        handle = str((await client.distribute(str(blob), "all", "normal")).handle)

        async def target_in(state: TargetState, min_bytes: int = 0) -> bool:
            t = (await client.status(handle)).targets[0]
            return t.state is state and t.bytes_done >= min_bytes

        await eventually(lambda: target_in(TargetState.TRANSFERRING, 16 * MiB))
        fleet.kill(dst)
        # the distributor notices; not a failure: the target resumes when it returns
        await eventually(lambda: target_in(TargetState.STALLED))
        status = await client.status(handle)
        assert status.targets[0].reason == "node unreachable"
        assert status.state is DistributionState.ACTIVE
        with Store(dst.home) as store:
            kept = store.info(blob).pieces_present
        assert kept > 0  # verified pieces survived the SIGKILL
        fleet.start([dst])
        await eventually(lambda: target_in(TargetState.COMPLETED))
    assert holds(dst, blob)


async def test_cli_drives_a_running_node(fleet: Fleet) -> None:
    src = fleet.add()
    dst = fleet.add(groups=["g"], caps=["gpu=true"])
    fleet.start()
    await fleet.wait_converged(20)
    r = cli(src.home, "peers", "--json")
    assert r.returncode == 0, r.stderr
    peers = json.loads(r.stdout)
    for p in peers:
        schemas.check(p, schemas.Peer)
    r = cli(src.home, "node", "info", "--json")
    info = schemas.check(json.loads(r.stdout), schemas.NodeInfo)
    assert info.node == src.node_id and info.ticket == src.ticket and info.peers_alive == 1
    assert cli(src.home, "ticket").stdout.strip() == src.ticket  # the running node's
    assert "ticket: " + src.ticket in cli(src.home, "node", "info").stdout
    assert [p["node"] for p in peers if p["node"] != src.node_id] == [dst.node_id]
    mine = next(p for p in peers if p["node"] == dst.node_id)
    assert mine["groups"] == ["g"] and mine["capabilities"] == {"gpu": True}
    payload = src.home.parent / "payload.bin"
    payload.write_bytes(os.urandom(2 * MiB))
    r = cli(src.home, "distribute", str(payload), "--to", "cap:gpu=true", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    final = json.loads(r.stdout)
    schemas.check(final, schemas.Status)
    assert final["state"] == "completed" and final["totals"]["completed"] == 1
    assert holds(dst, BlobId.parse(final["blob"]))
    r = cli(src.home, "distributions", "--json")
    assert [schemas.check(d, schemas.Status).handle for d in json.loads(r.stdout)] == [
        final["handle"]]
    assert json.loads(cli(src.home, "distributions", "--active", "--json").stdout) == []
    shown = json.loads(cli(src.home, "status", final["handle"], "--json").stdout)
    assert schemas.check(shown, schemas.Status).handle == final["handle"]
    r = cli(src.home, "status", final["handle"][:7])  # a unique prefix
    assert r.returncode == 0 and "completed" in r.stdout and final["handle"] in r.stdout
    r = cli(src.home, "distribute", final["blob"], "--to", "all", "-q")
    assert r.returncode == 0 and r.stdout.startswith("d-") and len(r.stdout.split()) == 1
    await wait_done(src, r.stdout.strip())
    listing = cli(src.home, "distributions").stdout
    assert all(w in listing for w in ("handle", "state", "eta", final["handle"], "completed"))
    pruned = schemas.check(json.loads(cli(src.home, "distributions", "prune", "--json").stdout),
                           schemas.Pruned)
    assert sorted(pruned.pruned) == sorted([final["handle"], r.stdout.strip()])
    assert json.loads(cli(src.home, "distributions", "--json").stdout) == []
    r = cli(dst.home, "status", "d-0123456789abcdef")
    assert r.returncode == 1 and r.stderr.startswith("blobmesh: error: unknown distribution")
    fleet.stop()
    r = cli(src.home, "peers")
    assert r.returncode == 1 and "no node is running" in r.stderr
    fresh = src.home.parent / "fresh.bin"
    fresh.write_bytes(os.urandom(1000))
    r = cli(src.home, "distribute", str(fresh), "--to", "all")
    assert r.returncode == 1 and "no node is running" in r.stderr
    with Store(src.home) as store:  # nothing was copied for a distribution that cannot run
        assert str(hash_bytes(fresh.read_bytes())) not in {str(b.blob_id) for b in store.blobs()}


async def test_point_to_point_get_from_a_node_is_for_members(fleet: Fleet, tmp_path: Path
                                                              ) -> None:
    src = fleet.add()
    member = fleet.add()
    fleet.start()
    await fleet.wait_converged(20)
    blob = add_blob(src, 3 * MiB)
    out = tmp_path / "out.bin"
    r = await asyncio.to_thread(cli, member.home, "get", str(blob), "--from", src.ticket,
                                "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    got = schemas.check(json.loads(r.stdout), schemas.Transferred)
    assert (got.blob, got.peer, got.total, got.output) == (str(blob), src.node_id, 3 * MiB,
                                                           str(out))
    with Store(src.home) as store:
        assert out.read_bytes() == store.get_data(blob, LeaseId.new("t"))
    r = await asyncio.to_thread(cli, member.home, "get", str(blob), "--from", src.ticket,
                                "--json")
    assert schemas.check(json.loads(r.stdout), schemas.AlreadyPresent).already_present
    stranger = tmp_path / "stranger"
    r = await asyncio.to_thread(cli, stranger, "get", str(blob), "--from", src.ticket)
    assert r.returncode != 0
    assert "not a member of this space" in r.stderr and "Traceback" not in r.stderr
