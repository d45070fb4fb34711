"""``distribute`` as people type it against real node processes: node ids by the prefix the
tables show, ``-q --wait`` for scripts, Ctrl-C on ``--wait``, a ``cap:`` scope the shell cut."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blobmesh.node.fleet import Fleet
from blobmesh.store import Store
from tests.cli import schemas
from tests.util import cli

pytestmark = pytest.mark.slow
MiB = 1024 * 1024


def test_a_cap_scope_the_shell_cut_says_to_quote_it(tmp_path: Path) -> None:
    # what `--to cap:gpu=true,mem_gb>=16` unquoted leaves (the shell took ">=16")
    r = cli(tmp_path / "h", "distribute", "bm1abcd", "--to", "cap:gpu=true,mem_gb")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert "quote cap: scopes" in r.stderr and "--to 'cap:gpu=true,mem_gb>=16'" in r.stderr


async def test_distribute_by_node_prefix_quietly_and_ctrl_c_on_wait(fleet: Fleet) -> None:
    src = fleet.add()
    dst = fleet.add(extra=["--download-rate", str(MiB)])  # 24 s: time to interrupt
    fleet.start()
    await fleet.wait_converged(20)
    with Store(src.home) as store:
        small = store.add_bytes(os.urandom(100_000)).blob_id
        big = store.add_bytes(os.urandom(24 * MiB)).blob_id
    # the prefix a status table shows (nd1 + 10), and one without nd1
    short = dst.node_id[:13]
    r = await asyncio.to_thread(cli, src.home, "distribute", str(small)[:10], "--to",
                                f"node:{short}", "-q", "--wait")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("d-") and len(r.stdout.split()) == 1
    assert "┃" not in r.stderr  # no progress table for a script
    shown = json.loads((await asyncio.to_thread(cli, src.home, "status", r.stdout.strip(),
                                                "--json")).stdout)
    assert schemas.check(shown, schemas.Status).scope == f"node:{dst.node_id}"
    assert shown["state"] == "completed"
    r = await asyncio.to_thread(cli, src.home, "distribute", str(small), "--to",
                                f"node:{dst.node_id[3:9]}", "--json")
    assert schemas.check(json.loads(r.stdout), schemas.Status).scope == f"node:{dst.node_id}"
    r = await asyncio.to_thread(cli, src.home, "distribute", str(small), "--to", "node:zzzzz")
    assert r.returncode == 2 and "no node matches 'nd1zzzzz'" in r.stderr

    waiter = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "blobmesh.cli.main", "--home", str(src.home), "distribute",
        str(big), "--to", "all", "--wait", "--json", stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        assert waiter.stderr is not None
        first = await asyncio.wait_for(waiter.stderr.readline(), 60)
        assert first.decode().startswith("following d-")
        waiter.send_signal(signal.SIGINT)  # Ctrl-C
        raw_out, raw_err = await asyncio.wait_for(waiter.communicate(), 30)
    finally:
        if waiter.returncode is None:
            waiter.kill()
            await waiter.wait()
    last = schemas.check(json.loads(raw_out), schemas.Status)  # the status when it stopped
    assert waiter.returncode == 130 and last.state == "active"
    err = raw_err.decode()
    assert f"stopped following; distribution {last.handle} goes on" in err
    assert f"blobmesh status {last.handle} --follow" in err and "Traceback" not in err
    r = await asyncio.to_thread(cli, src.home, "distributions", "--active", "--json")
    assert [d["handle"] for d in json.loads(r.stdout)] == [last.handle]  # it went on
    await asyncio.to_thread(cli, src.home, "cancel", last.handle)
