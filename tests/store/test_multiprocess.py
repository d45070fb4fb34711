"""Several real processes sharing one home at once, and processes killed with SIGKILL."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from blobmesh.hashing import BlobId, hash_bytes
from blobmesh.store import LeaseId, Store
from blobmesh.store.ingest import HELD_MAX
from tests.store.helpers import payload, start_worker


def _assert_clean(store: Store) -> None:
    report = store.fsck()
    assert report.ok, report.problems
    assert not any(store.layout.tmp.iterdir())
    assert not any(store.layout.trash.iterdir())


def test_concurrent_adds_reads_pins_and_gc(home: Path) -> None:
    Store(home).close()
    collector = start_worker("gc-loop", str(home))
    assert collector.stdout is not None and collector.stdin is not None
    assert collector.stdout.readline() == "collecting\n"
    workers = [start_worker("mixed", str(home), str(seed), "60") for seed in range(4)]
    pinned: dict[str, str] = {}
    for w in workers:
        out, _ = w.communicate(timeout=120)
        assert w.returncode == 0, f"worker failed: {out}"
        pinned.update(json.loads(out))
    collector.stdin.write("stop\n")
    collector.stdin.close()
    assert int(collector.stdout.read()) >= 1 and collector.wait(30) == 0
    assert pinned, "the workers pinned something"
    with Store(home) as store:
        assert {p.name: str(p.blob_id) for p in store.pins()} == pinned
        for blob in set(pinned.values()):
            blob_id = BlobId.parse(blob)
            assert hash_bytes(store.get_data(blob_id, LeaseId.new("check"))) == blob_id
        store.gc()  # every worker is gone: only pins hold blobs now
        assert {str(i.blob_id) for i in store.blobs()} == set(pinned.values())
        _assert_clean(store)


def test_kill_during_add(home: Path) -> None:
    Store(home).close()
    adder = start_worker("add-slowly", str(home), "64")
    assert adder.stdout is not None
    assert adder.stdout.readline() == "adding\n"
    adder.send_signal(signal.SIGKILL)
    assert adder.wait(30) == -signal.SIGKILL
    assert any((home / "tmp").iterdir())  # killed mid-write
    with Store(home) as store:
        assert store.blobs() == []
        _assert_clean(store)


@pytest.mark.parametrize("size", [300_000, HELD_MAX + 1])  # written in place; staged
def test_kill_between_move_and_commit(home: Path, size: int) -> None:
    with Store(home) as store:
        adder = start_worker("add-die-before-commit", str(home), str(size))
        assert adder.wait(30) == -signal.SIGKILL
        assert len(list(store.layout.blobs.iterdir())) == 1  # files moved, row never committed
        assert store.blobs() == []
    with Store(home) as store:
        assert store.blobs() == []
        assert not any(any(sub.iterdir()) for sub in store.layout.blobs.iterdir())
        _assert_clean(store)


def _blob_files(home: Path) -> list[Path]:
    return [f for sub in (home / "blobs").iterdir() for f in sub.iterdir()]


def _journals(home: Path) -> list[Path]:
    return [f for f in (home / "tmp").iterdir() if f.suffix == ".moving"]


def test_kill_during_add_many_before_its_commit(home: Path) -> None:
    """All files of a 20-blob add_many are in blobs/ when it dies: none of them appears."""
    Store(home).close()
    adder = start_worker("add-many-die-before-commit", str(home))
    assert adder.wait(30) == -signal.SIGKILL
    assert len(_blob_files(home)) == 20  # the data of each (layers: in the database)
    with Store(home) as store:
        assert store.blobs() == []
        assert not any(any(sub.iterdir()) for sub in store.layout.blobs.iterdir())
        _assert_clean(store)


def test_kill_inside_an_inline_batch_leaves_nothing(home: Path) -> None:
    """Kept inline, a batch is rows only: killed before its commit, nothing of it is left."""
    Store(home).close()
    adder = start_worker("add-many-inline-die-before-commit", str(home))
    assert adder.wait(30) == -signal.SIGKILL
    with Store(home) as store:
        assert store.blobs() == []
        assert store.db.query("SELECT count(*) FROM contents") == [(0,)]
        assert not any(store.layout.blobs.iterdir())  # not even a directory
        _assert_clean(store)


@pytest.mark.parametrize("mode", ["add-many-die-writing", "add-many-die-after-commit"])
def test_kill_inside_a_batch_commit_leaves_all_or_nothing(home: Path, mode: str) -> None:
    """One journal names the whole batch: killed while its files go into blobs/, none of the
    20 blobs appears; killed after its commit, before the journal is gone, all of them stay."""
    Store(home).close()
    adder = start_worker(mode, str(home), *(["10"] if mode == "add-many-die-writing" else []))
    assert adder.wait(30) == -signal.SIGKILL
    assert len(_journals(home)) == 1  # one for the batch, not one per blob
    committed = mode == "add-many-die-after-commit"
    assert len(_blob_files(home)) == (20 if committed else 10)
    with Store(home) as store:
        assert len(store.blobs()) == (20 if committed else 0)
        assert len(_blob_files(home)) == (20 if committed else 0)
        for info in store.blobs():
            assert hash_bytes(store.read_range(info.blob_id, 0, info.size)) == info.blob_id
        _assert_clean(store)


def test_kill_during_gc(home: Path) -> None:
    with Store(home) as store:
        # streamed: a data file and a layer file each to move out
        contents = {store.add_stream([payload(1000 + i, seed=i)]).blob_id:
                    payload(1000 + i, seed=i) for i in range(30)}
    gc = start_worker("gc-die-midway", str(home), "41")  # 20 blobs and a half moved out
    assert gc.wait(30) == -signal.SIGKILL
    assert len(list((home / "trash").iterdir())) == 40
    with Store(home) as store:  # the GC never committed: everything is back
        assert {i.blob_id for i in store.blobs()} == set(contents)
        for blob_id, data in contents.items():
            assert store.read_range(blob_id, 0, len(data), verify=True) == data
        _assert_clean(store)
        assert len(store.gc().deleted) == len(contents)
        _assert_clean(store)
