"""What a failed or killed operation leaves behind is undone (single-process regressions)."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from blobmesh.errors import StoreError, StoreFullError
from blobmesh.hashing import hash_bytes
from blobmesh.store import LeaseId, Store
from blobmesh.store import ingest as ingest_module
from blobmesh.store.ingest import HELD_MAX
from tests.store.helpers import failing_db, payload

DATA = payload(2_000_000, seed=5)


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_temp_files_of_dead_processes_are_removed(home: Path) -> None:
    Store(home).close()
    dead, alive = _dead_pid(), os.getpid()
    names = [f"add-{dead}-x.tmp", f"add-{dead}-x.pieces", f"partial-{dead}-y.tmp", "stray",
             f"add-{alive}-z.tmp"]
    for name in names:
        (home / "tmp" / name).write_bytes(b"junk")
    Store(home).close()
    assert [p.name for p in (home / "tmp").iterdir()] == [f"add-{alive}-z.tmp"]


def test_rows_never_committed_lose_their_files(home: Path) -> None:
    """A process that died between moving files in and committing leaves no orphan."""
    with Store(home) as store:
        blob_id = hash_bytes(DATA)
        for path in (store.layout.data_path(blob_id), store.layout.pieces_path(blob_id)):
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(b"half-moved")
        (store.layout.tmp / f"add-{_dead_pid()}-x.moving").write_text(blob_id.hex)
    with Store(home) as store:
        assert not store.layout.data_path(blob_id).exists()
        assert not any(store.layout.tmp.iterdir())
        assert store.fsck().ok


def test_uncommitted_gc_is_rolled_back_on_open(home: Path) -> None:
    with Store(home) as store:
        kept = store.add_bytes(DATA).blob_id
        gone = store.add_stream([b"gone"]).blob_id  # streamed: a layer file too
        data, pieces = store.layout.data_path(kept), store.layout.pieces_path(kept)
        os.replace(data, store.layout.trash / f"{data.name}~1-a")
        os.replace(pieces, store.layout.trash / f"{pieces.name}~1-a")
        trashed = store.layout.data_path(gone)
        os.replace(trashed, store.layout.trash / f"{trashed.name}~1-a")
        with store.db.write() as db:
            db.execute("DELETE FROM blobs WHERE id=?", (gone.digest,))
    with Store(home) as store:
        assert not any(store.layout.trash.iterdir())
        assert store.get_data(kept, LeaseId.new("r")) == DATA
        report = store.fsck()
        assert [p.kind for p in report.problems] == ["orphan"]  # gone's piece layer only


def test_trash_does_not_overwrite_a_blob_added_again(home: Path) -> None:
    """Regression: restoring trash replaced the file of a partial re-created meanwhile."""
    with Store(home) as store:
        layer = store.add_bytes(DATA).blob_id
        old = store.layout.data_path(layer)
        os.replace(old, store.layout.trash / old.name)  # as named before GC tokens
        old.write_bytes(b"newer file")
    with Store(home) as store:
        assert old.read_bytes() == b"newer file"
        assert not any(store.layout.trash.iterdir())


def _fail_on(monkeypatch: pytest.MonkeyPatch, name: str, exc: BaseException,
             after: int = 1) -> None:
    """Make ``os.<name>`` as used by the store raise ``exc`` from its call number ``after``."""
    real = getattr(os, name)
    calls = 0

    def failing(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls >= after:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, failing)


# fsync 1: the data, 2: the piece layer, 3: the directory, inside the transaction
@pytest.mark.parametrize(("name", "after"), [("write", 1), ("fsync", 1), ("fsync", 2),
                                              ("fsync", 3)])
def test_disk_full_leaves_nothing(store: Store, monkeypatch: pytest.MonkeyPatch, name: str,
                                  after: int) -> None:
    """Regression: ENOSPC while writing the piece layer (fsync 2) left its temp file."""
    _fail_on(monkeypatch, name, OSError(errno.ENOSPC, "No space left on device"), after)
    with pytest.raises(StoreFullError, match="disk full"):
        store.add_bytes(DATA)
    monkeypatch.undo()
    assert store.blobs() == [] and not any(store.layout.tmp.iterdir())
    assert store.add_bytes(DATA).blob_id == hash_bytes(DATA)


# in memory: one sync, of the files written in place, in the commit; staged: 1: the temp
# files, 2: the moves, in the commit
@pytest.mark.parametrize(("size", "call"), [(100, 1), (HELD_MAX + 1, 1), (HELD_MAX + 1, 2)])
def test_disk_full_in_a_batch_sync_leaves_nothing(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                  size: int, call: int) -> None:
    real = ingest_module._sync_filesystem
    calls = 0

    def failing(path: Path) -> bool:
        nonlocal calls
        calls += 1
        if calls >= call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(ingest_module, "_sync_filesystem", failing)
    with pytest.raises(StoreFullError, match="disk full"):
        store.add_many([payload(size + i, seed=i) for i in range(5)])
    monkeypatch.undo()
    assert calls == call
    assert store.blobs() == [] and store.fsck().ok and not any(store.layout.tmp.iterdir())
    assert not any(any(sub.iterdir()) for sub in store.layout.blobs.iterdir())
    assert len(store.add_many([payload(size + i, seed=i) for i in range(5)])) == 5


def test_failed_move_in_is_undone(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a failure after the files were renamed into blobs/ left orphans."""
    _fail_on(monkeypatch, "replace", OSError(errno.EIO, "I/O error"), after=2)
    with pytest.raises(StoreError, match="add failed"):
        store.add_bytes(DATA)
    monkeypatch.undo()
    assert store.blobs() == [] and store.fsck().ok
    assert not any(store.layout.tmp.iterdir())


def test_failed_commit_is_undone(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a COMMIT failing on a full disk left the transaction open and orphans."""
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    db = failing_db(store, monkeypatch, lambda sql: full if sql == "COMMIT" else None)
    with pytest.raises(StoreFullError):
        store.add_bytes(DATA)
    assert not db.in_transaction
    monkeypatch.undo()
    db.close()
    assert store.blobs() == [] and store.fsck().ok
    assert not any(store.layout.tmp.iterdir())
    assert store.add_bytes(DATA).complete


def test_unusable_home_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match="cannot create store home"):
        Store(tmp_path / "file" / "home")
    home = tmp_path / "home"
    (home / "store.sqlite").mkdir(parents=True)
    with pytest.raises(StoreError, match="cannot open the store database"):
        Store(home)
