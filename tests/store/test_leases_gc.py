"""Leases (per consumer and per pid), pins and the GC rules."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import pytest

from blobmesh.errors import BlobNotFoundError, PinNotFoundError, StoreError
from blobmesh.hashing import BlobId
from blobmesh.store import LeaseId, Store, pid_alive
from blobmesh.store.leases import pid_start_time
from tests.store.helpers import failing_db, payload, run_worker, start_worker


def _collected(store: Store) -> list[BlobId]:
    return store.gc().deleted


def test_unheld_blob_is_collected(store: Store) -> None:
    info = store.add_bytes(b"nobody holds me")
    report = store.gc(dry_run=True)
    assert report.deleted == [info.blob_id] and store.has(info.blob_id)
    report = store.gc()
    assert report.deleted == [info.blob_id] and report.bytes_freed == info.size
    assert not store.has(info.blob_id)
    assert not store.layout.data_path(info.blob_id).exists()
    assert not any(store.layout.trash.iterdir())


def test_leases_per_consumer(store: Store) -> None:
    a, b = LeaseId.new("a"), LeaseId.new("b")
    blob_id = store.add_bytes(b"shared", a).blob_id
    store.lease_by_content(blob_id, b)
    store.lease_by_content(blob_id, b)  # idempotent
    assert store.info(blob_id).leases == 2
    store.advise_lease_dropped(a, blob_id)
    assert _collected(store) == []
    store.advise_lease_dropped(b, blob_id)
    assert _collected(store) == [blob_id]
    with pytest.raises(BlobNotFoundError):
        store.get_data(blob_id, a)


def test_lease_dropped_only_for_its_blob(store: Store) -> None:
    lease = LeaseId.named("svc")
    x = store.add_bytes(b"x", lease).blob_id
    y = store.add_bytes(b"y", lease).blob_id
    store.advise_lease_dropped(lease, x)
    assert _collected(store) == [x]
    assert store.has(y)


def test_advise_pid_terminated_drops_all_its_leases(store: Store) -> None:
    pid = os.getpid()
    ids = [store.add_bytes(bytes([i]), LeaseId(f"c{i}", pid)).blob_id for i in range(3)]
    other = store.add_bytes(b"other", LeaseId("c", 1)).blob_id  # pid 1 (init) runs
    store.advise_pid_terminated(pid)
    assert sorted(_collected(store)) == sorted(ids)
    assert store.has(other)


def test_advise_of_pid_records_the_start_time(store: Store) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        lease = LeaseId("remote", child.pid)
        blob_id = store.add_bytes(b"for a child", lease).blob_id
        with store.db.lock:  # forget the start time, as for a lease taken before the pid ran
            store.db.conn.execute("UPDATE leases SET pid_start=NULL")
        store.advise_of_pid(child.pid)
        [(_, got, alive)] = store.leases(blob_id)
        assert (got, alive) == (lease, True)
        rows = store.db.query("SELECT pid_start FROM leases")
        assert rows == [(pid_start_time(child.pid),)]
        assert _collected(store) == []
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert _collected(store) == [blob_id]


def test_recycled_pid_does_not_keep_a_lease(store: Store) -> None:
    blob_id = store.add_bytes(b"recycled", LeaseId("old", os.getpid())).blob_id
    with store.db.lock:  # the lease was taken by an earlier process with our pid
        store.db.conn.execute("UPDATE leases SET pid_start=pid_start-1")
    assert not store.leases(blob_id)[0][2]
    report = store.gc()
    assert report.deleted == [blob_id] and report.dead_leases_dropped == 1


def test_dry_run_changes_nothing(store: Store) -> None:
    """Regression: a dry run dropped the leases of dead processes for real."""
    blob_id = store.add_bytes(b"dry", LeaseId("gone", os.getpid())).blob_id
    with store.db.lock:  # the lease belongs to an earlier process with our pid
        store.db.conn.execute("UPDATE leases SET pid_start=pid_start-1")
    report = store.gc(dry_run=True)
    assert (report.deleted, report.dead_leases_dropped) == ([blob_id], 1)
    assert len(store.leases(blob_id)) == 1 and store.has(blob_id)
    assert store.gc().deleted == [blob_id]


def test_lease_taken_again_after_pid_reuse_is_live(store: Store) -> None:
    """Regression: re-taking a named lease kept the dead previous owner's start time."""
    lease = LeaseId.named("svc")
    blob_id = store.add_bytes(b"reused", lease).blob_id
    with store.db.lock:  # as if an earlier process with our pid had taken the same lease
        store.db.conn.execute("UPDATE leases SET pid_start=pid_start-1")
    store.lease_by_content(blob_id, lease)
    assert store.leases(blob_id)[0][2]
    assert _collected(store) == []


def test_leases_of_a_dead_process_are_dropped(store: Store) -> None:
    """A real process leases a blob and exits without any advice: GC checks liveness."""
    blob_id = store.add_bytes(payload(50_000)).blob_id
    holder = start_worker("hold", str(store.home), str(blob_id))
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline() == "held\n"
    [(_, lease, alive)] = store.leases(blob_id)
    assert lease.pid == holder.pid and alive
    assert _collected(store) == []
    holder.stdin.close()
    assert holder.wait(30) == 0
    assert not pid_alive(holder.pid, None)
    report = store.gc()
    assert report.deleted == [blob_id] and report.dead_leases_dropped == 1


def test_zombie_holds_no_lease(store: Store) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 20
    while pid_start_time(child.pid) is not None:  # exited but not yet reaped: a zombie
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert os.path.exists(f"/proc/{child.pid}")
    blob_id = store.add_bytes(b"zombie", LeaseId("z", child.pid)).blob_id
    assert _collected(store) == [blob_id]
    child.wait()


def test_open_reader_holds_its_blob(store: Store) -> None:
    lease = LeaseId.new("r")
    blob_id = store.add_bytes(payload(100_000)).blob_id
    reader = store.get_reader(blob_id, lease)
    store.advise_lease_dropped(lease, blob_id)  # only the reader's own hold remains
    assert _collected(store) == []
    assert reader.read() == payload(100_000)
    reader.close()
    assert _collected(store) == [blob_id]


def test_reader_in_another_process_holds_its_blob(store: Store) -> None:
    blob_id = store.add_bytes(payload(10_000)).blob_id
    out = run_worker("read-during-gc", str(store.home), str(blob_id))
    assert out.split() == ["0", "ok"]  # the GC in the middle of the read deleted nothing
    assert _collected(store) == [blob_id]


def test_pins(store: Store) -> None:
    a = store.add_bytes(b"a").blob_id
    b = store.add_bytes(b"b").blob_id
    store.pin(a, "model/latest")
    store.pin(a, "model/v1")
    assert store.info(a).pins == ("model/latest", "model/v1")
    store.pin(b, "model/latest")  # re-point
    assert [(p.name, p.blob_id) for p in store.pins()] == [("model/latest", b), ("model/v1", a)]
    assert _collected(store) == []
    assert store.unpin("model/v1") == a
    assert _collected(store) == [a]
    with pytest.raises(PinNotFoundError):
        store.unpin("model/v1")
    with pytest.raises(BlobNotFoundError):
        store.pin(a, "gone")
    for bad in ("", "x" * 257):
        with pytest.raises(StoreError):
            store.pin(b, bad)


def test_gc_failure_puts_files_back(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: an error inside GC's transaction used to leave files in trash/."""
    ids = [store.add_bytes(bytes([i]) * 100).blob_id for i in range(3)]
    deletes = 0

    def second_delete(sql: str) -> BaseException | None:
        nonlocal deletes
        if not sql.startswith("DELETE FROM blobs"):
            return None
        deletes += 1
        return sqlite3.OperationalError("disk I/O error") if deletes == 2 else None

    db = failing_db(store, monkeypatch, second_delete)
    with pytest.raises(StoreError, match="disk I/O error"):
        store.gc()
    assert all(store.layout.data_path(i).exists() for i in ids)
    assert not any(store.layout.trash.iterdir())
    assert store.fsck().ok
    db.close()
