"""Collections in a store: summaries, pins that hold members, GC and fsck."""

from __future__ import annotations

from pathlib import Path

import pytest

from blobmesh import collection
from blobmesh.collection import add_tree, read_collection, summarize
from blobmesh.errors import ExportError, NotACollectionError
from blobmesh.store import Store


def test_pin_holds_every_member_through_gc(tree: Path, tmp_path: Path) -> None:
    with Store(tmp_path / "home") as store:
        cid = add_tree(store, tree).collection_id
        members = set(read_collection(store, cid).members())
        collection.pin(store, cid, "model/v1")
        assert store.gc().deleted == []
        assert all(store.has(m) for m in members)
        collection.unpin(store, "model/v1")
        assert store.pins() == []
        gone = set(store.gc().deleted)
        assert gone == members | {cid}


def test_gc_walks_collections_pinned_by_a_plain_pin(tree: Path, tmp_path: Path) -> None:
    with Store(tmp_path / "home") as store:
        cid = add_tree(store, tree).collection_id
        store.pin(cid, "dist/d-0123456789abcdef")  # e.g. a distribution's pin
        plain = store.add_bytes(b"not held by anything").blob_id
        assert collection.protect_pinned(store) == len(read_collection(store, cid).members())
        assert store.gc().deleted == [plain]
        assert summarize(store, cid).complete
        store.unpin("dist/d-0123456789abcdef")
        collection.protect_pinned(store)  # drops the member pins of the pin that went
        assert store.pins() == []


def test_summary_and_fsck_see_missing_members(tree: Path, tmp_path: Path) -> None:
    with Store(tmp_path / "home") as store:
        cid = add_tree(store, tree).collection_id
        s = summarize(store, cid)
        assert (s.files, s.members, s.members_present) == (5, 5, 5)
        assert s.entries == 9 and s.bytes_present == s.total_size
        store.pin(cid, "keep")  # the collection only, not its members
        assert collection.check(store) == []
        store.gc()
        s = summarize(store, cid)
        assert s.members_present == 0 and not s.complete
        problems = collection.check(store)
        assert [(p.collection, p.kind) for p in problems] == [(cid, "missing")]
        assert "5 of 5 member blob(s) missing" in problems[0].detail
        with pytest.raises(ExportError, match="not complete here"):
            collection.export_tree(store, cid, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_plain_blobs_are_not_collections(tmp_path: Path) -> None:
    with Store(tmp_path / "home") as store:
        blob = store.add_bytes(b"plain").blob_id
        assert collection.maybe_collection(store, blob) is None
        with pytest.raises(NotACollectionError):
            read_collection(store, blob)
