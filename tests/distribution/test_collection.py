"""Distributing collections: the fetcher over an in-memory swarm (hostile manifests and plans
included), then real node processes moving a directory and a v2 that changed in place."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from blobmesh.collection import add_tree, export_tree, read_collection
from blobmesh.collection.catalog import member_pin
from blobmesh.collection.manifest import MAGIC, File, _Manifest
from blobmesh.distribution.collection import CollectionDistributor, CollectionPlan, FetchRequest
from blobmesh.distribution.model import DistributionState, Priority
from blobmesh.distribution.swarm import JobProgress
from blobmesh.errors import InvalidCollectionError, TransferError
from blobmesh.hashing import BlobId, hash_bytes
from blobmesh.node.client import NodeClient
from blobmesh.node.fleet import Fleet, FleetNode
from blobmesh.transport.identity import NodeId
from tests.collection.test_tree import snapshot
from tests.distribution.test_swarm import Peer, swarm
from tests.util import cli, wait_done

MiB = 1024 * 1024
PIN = "dist/d-0123456789abcdef"
PIECE = 256 * 1024


def make_model(root: Path) -> Path:
    (root / "shards").mkdir(parents=True)
    for i in range(3):
        (root / "shards" / f"{i:02}.safetensors").write_bytes(os.urandom(4 * MiB + 17 * i))
    (root / "tokenizer").mkdir()
    for i in range(120):  # enough for a pack; each one is a commit on every target
        (root / "tokenizer" / f"vocab-{i:03}.txt").write_bytes(os.urandom(1000 + i))
    (root / "empty").mkdir()
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "latest").symlink_to("shards/00.safetensors")
    return root


def fetch_request(src: Peer, blob_id: BlobId, payload: bytes, everyone: list[NodeId],
                  seen: list[JobProgress]) -> FetchRequest:
    info = src.store.info(blob_id)
    return FetchRequest(blob_id, info.size, info.piece_size, payload, lambda: everyone,
                        Priority.NORMAL, seen.append, PIN)


async def test_fetch_moves_the_tree_with_a_pack_and_reports_totals(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model")
    async with swarm(tmp_path, 3) as peers:
        src, *targets = peers
        cid = add_tree(src.store, model).collection_id
        plan = await CollectionDistributor(src.engine).plan(cid, PIN,
                                                            "", False)
        assert plan is not None
        decoded = msgspec.msgpack.decode(plan.payload, type=CollectionPlan)
        assert decoded.pack and decoded.pack_size == sum(
            1000 + i for i in range(120)) + len("#!/bin/sh\n")
        everyone = [p.node_id for p in peers]
        seen: list[list[JobProgress]] = [[] for _ in targets]
        await asyncio.wait_for(asyncio.gather(*(
            CollectionDistributor(t.engine).fetch(
                fetch_request(src, cid, plan.payload, everyone, s))
            for t, s in zip(targets, seen, strict=True))), 60)
        for t, s in zip(targets, seen, strict=True):
            coll = read_collection(t.store, cid)
            assert all(t.store.has(m) for m in coll.members())
            assert s[-1].bytes_done == s[-1].bytes_total == plan.total_size
            out = tmp_path / f"out-{t.node_id.short()}"
            export_tree(t.store, cid, out)
            assert snapshot(out) == snapshot(model)
            # the pack served its purpose: its pin went (GC takes it), the tree's stay
            pins = {p.name for p in t.store.pins()}
            assert member_pin(PIN, BlobId(decoded.pack)) not in pins and PIN in pins


async def test_a_member_that_fails_ends_the_fetch_with_its_own_typed_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(tmp_path / "model")
    async with swarm(tmp_path, 2) as peers:
        src, target = peers
        cid = add_tree(src.store, model).collection_id
        plan = await CollectionDistributor(src.engine).plan(cid, PIN, "", False)
        assert plan is not None
        shard = hash_bytes((model / "shards" / "01.safetensors").read_bytes())
        download = target.engine.download

        async def failing(blob_id: BlobId, *args: Any, **kwargs: Any) -> None:
            if blob_id == shard:
                raise TransferError(f"{blob_id} incomplete after all pieces arrived",
                                    blob_id=blob_id)
            await download(blob_id, *args, **kwargs)

        monkeypatch.setattr(target.engine, "download", failing)
        # (the distribution service retries a TransferError; an ExceptionGroup killed its
        # receive task, and the target never finished nor said why)
        with pytest.raises(TransferError, match="incomplete after all pieces arrived"):
            await asyncio.wait_for(CollectionDistributor(target.engine).fetch(
                fetch_request(src, cid, plan.payload, [p.node_id for p in peers], [])), 60)


async def test_a_hostile_manifest_or_plan_is_refused_before_members_move(
        tmp_path: Path) -> None:
    member = b"payload"
    hostile = MAGIC + msgspec.msgpack.encode(_Manifest(1, [
        File("../../etc/cron.d/x", len(member), False, hash_bytes(member).digest)]))
    async with swarm(tmp_path, 2) as peers:
        src, target = peers
        src.store.add_bytes(member)
        bad = src.store.add_bytes(hostile).blob_id
        everyone = [p.node_id for p in peers]
        seen: list[JobProgress] = []
        with pytest.raises(InvalidCollectionError, match=r"'\.\.' component"):
            await CollectionDistributor(target.engine).fetch(
                fetch_request(src, bad, msgspec.msgpack.encode(CollectionPlan()), everyone,
                              seen))
        assert [b.blob_id for b in target.store.blobs()] == [bad]  # the manifest only
        with pytest.raises(InvalidCollectionError, match="malformed collection plan"):
            await CollectionDistributor(target.engine).fetch(
                fetch_request(src, bad, b"\xc1", everyone, seen))
        escape = msgspec.msgpack.encode(CollectionPlan(export="../../../etc", export_force=True))
        with pytest.raises(InvalidCollectionError, match="must be a relative path"):
            await CollectionDistributor(target.engine).fetch(
                fetch_request(src, bad, escape, everyone, seen))


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


@pytest.mark.slow
async def test_directory_to_a_fleet_then_v2_moves_only_changed_pieces(
        fleet: Fleet, tmp_path: Path) -> None:
    src = fleet.add()
    targets = [fleet.add(groups=["g"]) for _ in range(2)]
    fleet.start()
    await fleet.wait_converged(20)
    model = make_model(tmp_path / "model")

    async def distribute(*extra: str) -> BlobId:
        r = cli(src.home, "distribute", str(model), "--to", "group:g", "--json", *extra)
        assert r.returncode == 0, r.stderr
        handle = re.search(r'"handle": "(d-[0-9a-f]+)"', r.stdout)
        assert handle is not None
        final = await wait_done(src, handle.group(1), timeout=90)
        assert final.state is DistributionState.COMPLETED, final
        return final.blob_id

    cid = await distribute()
    r = cli(targets[0].home, "export", str(cid), str(tmp_path / "v1"))
    assert r.returncode == 0, r.stderr
    assert snapshot(tmp_path / "v1") == snapshot(model)
    before = [await downloaded(t) for t in targets]
    # v2: 10 % of the pieces of every shard rewritten in place, one small file changed; each
    # target materialises it itself once it is complete, in its own home
    changed = sum(rewrite_pieces(shard, every=10)
                  for shard in sorted((model / "shards").iterdir()))
    (model / "tokenizer" / "vocab-007.txt").write_bytes(b"changed")
    v2 = await distribute("--export", "models/m")
    assert v2 != cid
    moved = [await downloaded(t) - b for t, b in zip(targets, before, strict=True)]
    for t, m in zip(targets, moved, strict=True):
        # the changed pieces, the small file and the new manifest; not the shards again
        assert changed <= m <= 1.2 * changed + 64 * 1024, (m, changed)
        assert snapshot(t.home / "exports" / "models" / "m") == snapshot(model)
    r = cli(src.home, "distribute", str(model), "--to", "group:g", "--export", "/etc")
    assert r.returncode == 1 and "must be a relative path" in r.stderr
