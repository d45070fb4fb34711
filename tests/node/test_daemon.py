"""The node daemon as real processes: the home lock, a stable port, rejoin after restarts, logs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from blobmesh.node.client import NodeClient
from blobmesh.node.fleet import Fleet
from blobmesh.store import Store
from blobmesh.transport import Ticket
from blobmesh.transport.ticket import format_address
from tests.util import eventually

pytestmark = pytest.mark.slow


async def test_second_node_on_a_home_is_refused_and_the_first_keeps_its_socket(
        fleet: Fleet) -> None:
    a = fleet.add()
    fleet.start()
    r = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "blobmesh.cli.main", "--home", str(a.home),
                         "node", "run"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"blobmesh: error: another node (pid {a.proc.pid if a.proc else 0}) is running on "
        f"home {a.home}"]
    async with NodeClient(a.home) as client:
        assert (await client.node())["node"] == a.node_id


async def test_restarted_seed_rejoins_with_the_same_command(fleet: Fleet) -> None:
    x = fleet.add(groups=["edge"])
    y = fleet.add(groups=["edge"])
    fleet.start()
    await fleet.wait_converged(20)
    ticket = x.ticket
    fleet.restart(x)
    assert x.ticket == ticket  # same port: tickets handed out stay valid
    await fleet.wait_converged(20)  # x redials y, which it remembered; y sees x again
    mark = len(x.stderr())
    fleet.terminate([y])

    def logged_after(start: int, *lines: str) -> int:
        logs = x.stderr()
        found = [i for line in lines if (i := logs.find(f"peer {y.node_id} {line}", start)) >= 0]
        return min(found) if found else -1

    # the node looks at its space once a second; a leave that did not arrive in time (a
    # loaded machine) still shows as a suspect
    await eventually(lambda: logged_after(mark, "left", "is suspect") >= 0)
    gone = logged_after(mark, "left", "is suspect")
    fleet.start([y])  # bootstrapping from x, on the port y had
    await fleet.wait_converged(20)
    await eventually(lambda: logged_after(gone, "joined", "is alive") > gone)
    logs = x.stderr()
    assert f"listening on {ticket_address(x.ticket)}" in logs and f"ticket {ticket}" in logs


async def test_distribution_events_are_logged(fleet: Fleet) -> None:
    src = fleet.add()
    dst = fleet.add()
    fleet.start()
    await fleet.wait_converged(20)
    with Store(src.home) as store:
        blob = store.add_bytes(os.urandom(300_000)).blob_id
    async with NodeClient(src.home) as client:
        handle = (await client.distribute(str(blob), "all", "normal")).handle

        def logged() -> bool:
            return (f"distribution {handle} completed" in src.stderr()
                    and f"distribution {handle} received" in dst.stderr())

        await eventually(logged)
        with pytest.raises(Exception, match="no node other than this one"):
            await client.distribute(str(blob), "group:nobody", "normal")
    assert f"distribution {handle} started: blob {blob}" in src.stderr()


def ticket_address(ticket: str) -> str:
    return format_address(Ticket.parse(ticket).addrs[0])


async def test_config_file_then_sighup_reloads_it(fleet: Fleet) -> None:
    a = fleet.add(extra=["--log-level", "info"])
    a.home.mkdir(parents=True)
    (a.home / "config.toml").write_text('group = ["from-file"]\nlog_level = "warning"\n')
    fleet.start()
    async with NodeClient(a.home) as client:
        info = await client.node()
    assert info["groups"] == ["from-file"]  # the file is read
    assert "listening on" in a.stderr()  # the flag's info level beat the file's warning
    assert a.proc is not None
    (a.home / "config.toml").write_text('group = ["from-file"]\nwant_peers = 2\n')
    a.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: "SIGHUP: reloaded" in a.stderr() and "want 2 peers" in a.stderr())
    (a.home / "config.toml").write_text("want_peers = 'many'\n")
    a.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: "SIGHUP: config not reloaded" in a.stderr())
    async with NodeClient(a.home) as client:  # still serving
        assert (await client.node())["node"] == a.node_id
