"""Collections over real node processes: a directory to a fleet, then a v2 that moves only
the pieces that changed."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from blobmesh.collection import add_tree
from blobmesh.distribution.model import DistributionState
from blobmesh.node.client import NodeClient
from blobmesh.node.fleet import Fleet, FleetNode
from blobmesh.store import Store
from tests.collection.test_tree import snapshot
from tests.distribution.test_e2e import cli, fleet, wait_done  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow
MiB = 1024 * 1024
PIECE = 256 * 1024


def make_model(root: Path) -> Path:
    (root / "shards").mkdir(parents=True)
    for i in range(3):
        (root / "shards" / f"{i:02}.safetensors").write_bytes(os.urandom(4 * MiB + 17 * i))
    (root / "tokenizer").mkdir()
    for i in range(300):
        (root / "tokenizer" / f"vocab-{i:03}.txt").write_bytes(os.urandom(1000 + i))
    (root / "empty").mkdir()
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "latest").symlink_to("shards/00.safetensors")
    return root


def rewrite_pieces(path: Path, every: int) -> int:
    """Rewrite every ``every``-th whole piece of a file in place; returns bytes changed."""
    changed = 0
    with open(path, "r+b") as f:
        for i in range(0, path.stat().st_size // PIECE, every):
            f.seek(i * PIECE)
            f.write(os.urandom(PIECE))
            changed += PIECE
    return changed


async def downloaded(node: FleetNode) -> int:
    async with NodeClient(node.home) as c:
        text = await c.metrics()
    m = re.search(r"^blobmesh_swarm_downloaded_bytes_total (\S+)$", text, re.M)
    assert m is not None
    return int(float(m.group(1)))


async def test_directory_to_a_fleet_then_v2_moves_only_changed_pieces(
        fleet: Fleet, tmp_path: Path) -> None:  # noqa: F811
    src = fleet.add()
    targets = [fleet.add(groups=["g"]) for _ in range(2)]
    fleet.start()
    await fleet.wait_converged(20)
    model = make_model(tmp_path / "model")

    async def distribute(version: str, *extra: str) -> None:
        r = cli(src.home, "distribute", str(model), "--to", "group:g", "--json", *extra)
        assert r.returncode == 0, r.stderr
        handle = re.search(r'"handle": "(d-[0-9a-f]+)"', r.stdout)
        assert handle is not None
        final = await wait_done(src, handle.group(1), timeout=90)
        assert final.state is DistributionState.COMPLETED, final
        with Store(src.home) as store:
            cid = add_tree(store, model).collection_id
        assert final.blob_id == cid
        for t in targets:
            dest = tmp_path / f"{version}-{t.index}"
            r = cli(t.home, "export", str(cid), str(dest))
            assert r.returncode == 0, r.stderr
            assert snapshot(dest) == snapshot(model)

    await distribute("v1")
    before = [await downloaded(t) for t in targets]
    # v2: 10 % of the pieces of every shard rewritten in place, one small file changed
    changed = sum(rewrite_pieces(shard, every=10)
                  for shard in sorted((model / "shards").iterdir()))
    (model / "tokenizer" / "vocab-007.txt").write_bytes(b"changed")
    await distribute("v2")
    moved = [await downloaded(t) - b for t, b in zip(targets, before, strict=True)]
    for m in moved:
        # the changed pieces, the small file and the new manifest; not the shards again
        assert changed <= m <= 1.2 * changed + 64 * 1024, (m, changed)

    # --export: a target materialises the tree itself once it is complete
    dest = tmp_path / "exported-by-the-node"
    r = cli(src.home, "distribute", str(model), "--to", f"node:{targets[0].node_id}",
            "--export", str(dest), "--wait")
    assert r.returncode == 0, r.stderr
    assert snapshot(dest) == snapshot(model)
