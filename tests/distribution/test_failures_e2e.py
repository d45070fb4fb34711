"""A full disk and rotten copies, between real ``node run`` processes on loopback.

Before (issue 10): a target whose disk filled stayed "transferring 56 MiB" for minutes with no
reason while ~5,800 traceback lines flooded its log; ``distribute`` accepted a blob whose data
file was corrupt on the source (its targets stalled at 63/64 pieces, "no progress"), and a node
holding a corrupt copy counted as a completed target.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from blobmesh.distribution.model import DistributionState, TargetState
from blobmesh.node.client import NodeClient
from blobmesh.node.fleet import Fleet
from blobmesh.store import Store
from tests.util import (
    add_blob,
    cli,
    eventually,
    flip_byte,
    holds,
    needs_root,
    tmpfs,
    wait_done,
)

pytestmark = pytest.mark.slow
MiB = 1024 * 1024


def metric(text: str, name: str) -> float:
    found = re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert len(found) == 1, (name, text)
    return float(found[0])


@needs_root
async def test_a_target_whose_disk_fills_says_so_once_keeps_its_pieces_and_resumes(
        fleet: Fleet, tmp_path: Path) -> None:
    src = fleet.add()
    dst = fleet.add()
    with tmpfs(dst.home, 64):  # the target's whole home on a small disk of its own
        try:
            fleet.start()
            await fleet.wait_converged(20)
            filler = dst.home / "filler"
            filler.write_bytes(b"\0" * (shutil.disk_usage(dst.home).free - 6 * MiB))
            blob = add_blob(src, 16 * MiB)  # about 6 MiB of it fit
            async with NodeClient(src.home) as client:
                handle = str((await client.distribute(str(blob), f"node:{dst.node_id}",
                                                      "normal")).handle)

                async def waiting_for_disk() -> bool:
                    t = (await client.status(handle)).targets[0]
                    assert t.state is not TargetState.FAILED, t
                    return t.state is TargetState.WAITING_DISK and t.reason == "disk full"

                await eventually(waiting_for_disk, 20)
                # its verified pieces are kept (durable) while it waits, and it keeps waiting
                with Store(dst.home) as store:
                    kept = store.info(blob).bytes_present
                assert kept > 0
                await asyncio.sleep(3)  # disk_retry is 1 s: a few more looks at the disk
                still = (await client.status(handle)).targets[0]
                assert (still.state, still.reason) == (TargetState.WAITING_DISK, "disk full")
                # one line in its log, not a flood
                full = [line for line in dst.stderr().splitlines() if "disk full" in line]
                assert len(full) == 1, full
                filler.unlink()
                final = await wait_done(src, handle, 30)
            assert final.state is DistributionState.COMPLETED, final
            assert holds(dst, blob)
            async with NodeClient(dst.home) as client:
                text = await client.metrics()
            # what it kept was not fetched again (only pieces in flight when the disk filled)
            downloaded = metric(text, "blobmesh_swarm_downloaded_bytes_total")
            assert downloaded < 16 * MiB + kept, (downloaded, kept)
            assert [line for line in dst.stderr().splitlines() if "disk full" in line] == full
        finally:
            fleet.stop()  # before the disk goes away under the node


async def test_distribute_refuses_a_corrupt_source_copy_and_quarantines_it(
        fleet: Fleet) -> None:
    src = fleet.add()
    dst = fleet.add()
    fleet.start()
    await fleet.wait_converged(20)
    blob = add_blob(src, 8 * MiB)
    with Store(src.home) as store:
        data_file = store.layout.data_path(blob)
    flip_byte(data_file, 5 * MiB)
    r = await asyncio.to_thread(cli, src.home, "distribute", str(blob), "--to", "all")
    assert r.returncode != 0 and r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and f"blob {blob} is corrupt in this node's store" in err[0], err
    assert "quarantined" in err[0] and "Traceback" not in r.stderr
    with Store(src.home) as store:
        assert not store.has(blob)
        rotten = [p for p in store.layout.quarantine.iterdir() if p.name.startswith(blob.hex)]
    assert rotten and not data_file.exists()
    assert stat.S_IMODE(rotten[0].stat().st_mode) == 0o600
    # nothing was started: no distribution on the source, none received by the target
    for node in (src, dst):
        listed = await asyncio.to_thread(cli, node.home, "distributions", "--json")
        assert listed.returncode == 0 and listed.stdout.strip() == "[]", listed
    with Store(dst.home) as store:
        assert not store.has(blob)


async def test_a_target_holding_a_corrupt_copy_completes_only_with_a_good_one(
        fleet: Fleet) -> None:
    src = fleet.add()
    dst = fleet.add()
    fleet.start()
    await fleet.wait_converged(20)
    data = os.urandom(8 * MiB)
    blob = add_blob(src, 0, data)
    add_blob(dst, 0, data)
    with Store(dst.home) as store:
        flip_byte(store.layout.data_path(blob), 3 * MiB)
    async with NodeClient(src.home) as client:
        handle = str((await client.distribute(str(blob), "all", "normal")).handle)
    final = await wait_done(src, handle, 30)
    assert final.state is DistributionState.COMPLETED
    # counted completed only because it now holds a copy that verifies (before: the rotten
    # copy counted), and the rotten one was reported and quarantined
    assert holds(dst, blob)
    async with NodeClient(dst.home) as client:
        text = await client.metrics()
    assert metric(text, "blobmesh_swarm_corrupt_copies_total") == 1
    assert metric(text, "blobmesh_swarm_downloaded_bytes_total") >= 8 * MiB
    with Store(dst.home) as store:
        assert [p for p in store.layout.quarantine.iterdir() if p.name.startswith(blob.hex)]
    assert "the local copy is corrupt" in dst.stderr()
