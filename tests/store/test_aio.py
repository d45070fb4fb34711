"""The async boundary: group commit, and an event loop that never waits for the store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from blobmesh.errors import BlobNotFoundError, CorruptBlobError, VerificationError
from blobmesh.hashing import hash_bytes, hash_stream
from blobmesh.store import BlobInfo, LeaseId, Store
from blobmesh.store.store import AddSource
from tests.store.helpers import payload, start_worker


async def test_concurrent_small_adds_commit_together(store: Store,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = store.add_many

    def counting(sources: list[AddSource], lease: LeaseId | None = None, *,
                 inline: bool = False) -> list[BlobInfo]:
        calls.append(len(sources))
        return real(sources, lease, inline=inline)

    monkeypatch.setattr(store, "add_many", counting)
    lease = LeaseId.new("rx")
    blobs = [payload(16384, seed=i) for i in range(200)]
    infos = await asyncio.gather(*(store.aio.add_bytes(b, lease) for b in blobs))
    assert [i.blob_id for i in infos] == [hash_bytes(b) for b in blobs]
    assert sum(calls) == 200 and len(calls) <= 10  # batches, not a transaction per blob
    assert {b.blob_id for b in store.blobs()} == {i.blob_id for i in infos}
    assert all(b.leases == 1 for b in store.blobs())
    assert not any(any(d.iterdir()) for d in store.layout.blobs.iterdir())  # kept inline
    assert await store.aio.read_small([(i.blob_id, i.size) for i in infos[:3]],
                                      verify=True) == blobs[:3]
    assert store.fsck().ok


async def test_a_bad_blob_fails_alone(store: Store) -> None:
    good, bad = payload(100, seed=1), payload(100, seed=2)
    results = await asyncio.gather(
        store.aio.add_bytes(good, expected=hash_bytes(good)),
        store.aio.add_bytes(bad, expected=hash_bytes(good)),
        return_exceptions=True)
    assert not isinstance(results[0], BaseException) and results[0].complete
    assert isinstance(results[1], VerificationError)
    assert [b.blob_id for b in store.blobs()] == [hash_bytes(good)]


async def test_concurrent_flushes_of_many_partials(store: Store) -> None:
    piece = 64 * 1024
    datas = [payload(5 * piece + 7, seed=i) for i in range(6)]
    layers = [hash_stream([d], piece)[1] for d in datas]
    aio = store.aio
    partials = [await aio.begin_partial(layer, LeaseId.new("rx")) for layer in layers]
    for p, d in zip(partials, datas, strict=True):
        for i in range(3):
            start, length = p.layer.piece_range(i)
            assert await aio.io(p.write_piece, i, d[start : start + length])
    haves = await asyncio.gather(*(aio.flush(p) for p in partials))
    assert all(set(h) == {0, 1, 2} for h in haves)
    assert all(set(store.bitfield(layer.blob_id)) == {0, 1, 2} for layer in layers)
    for p in partials:
        await aio.close_partial(p)


async def test_locked_store_delays_store_work_not_the_loop(home: Path) -> None:
    """Another process holds the write lock for 2 s: the loop keeps ticking, the store
    call waits and then succeeds."""
    with Store(home) as store:
        blob = store.add_bytes(b"pin me").blob_id
        locker = start_worker("lock-store", str(home), "2")
        assert locker.stdout is not None
        assert await asyncio.to_thread(locker.stdout.readline) == "locked\n"
        lag = 0.0
        pinned = asyncio.create_task(store.aio.pin(blob, "held"))
        t0 = time.monotonic()
        while not pinned.done():
            before = time.monotonic()
            await asyncio.sleep(0.01)
            lag = max(lag, time.monotonic() - before - 0.01)
        await pinned
        waited = time.monotonic() - t0
        assert locker.wait(30) == 0
        assert waited > 1.0, "the pin did not wait for the lock: the test proves nothing"
        assert lag < 0.1, f"the event loop stalled for {lag:.3f}s"  # a held loop: ~2 s
        assert [p.name for p in store.pins()] == ["held"]


async def test_calls_after_close_raise(home: Path) -> None:
    store = Store(home)
    aio = store.aio
    store.close()
    with pytest.raises(RuntimeError):
        await aio.add_bytes(b"late")
    with pytest.raises(RuntimeError):
        await aio.has(hash_bytes(b"late"))


async def test_one_failing_flush_does_not_fail_the_batch(store: Store) -> None:
    piece = 64 * 1024
    datas = [payload(2 * piece, seed=10 + i) for i in range(2)]
    layers = [hash_stream([d], piece)[1] for d in datas]
    aio = store.aio
    gone, kept = [await aio.begin_partial(layer, LeaseId.new("rx")) for layer in layers]
    for p, d in ((gone, datas[0]), (kept, datas[1])):
        await aio.io(p.write_piece, 0, d[:piece])
    with store.db.write() as conn:  # as fsck --repair quarantining it under its writer
        conn.execute("DELETE FROM blobs WHERE id=?", (gone.blob_id.digest,))
    busy = asyncio.ensure_future(aio.meta(time.sleep, 0.3))  # both flushes queue: one batch
    await asyncio.sleep(0.05)
    results = await asyncio.gather(aio.flush(gone), aio.flush(kept), return_exceptions=True)
    await busy
    assert isinstance(results[0], BlobNotFoundError)
    assert not isinstance(results[1], BaseException) and set(results[1]) == {0}
    assert set(store.bitfield(kept.blob_id)) == {0}
    await aio.close_partial(kept)
    with pytest.raises(BlobNotFoundError):
        gone.close()


async def test_add_verified_commits_once_and_drops_liars(store: Store,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = store.add_many

    def counting(sources: list[AddSource], lease: LeaseId | None = None, *,
                 inline: bool = False) -> list[BlobInfo]:
        calls.append(len(sources))
        return real(sources, lease, inline=inline)

    monkeypatch.setattr(store, "add_many", counting)
    blobs = [payload(5000, seed=i) for i in range(50)]
    claimed = [hash_bytes(b) for b in blobs]
    claimed[7] = hash_bytes(b"something else")
    results = await store.aio.add_verified(list(zip(blobs, claimed, strict=True)),
                                           LeaseId.new("rx"))
    assert calls == [49]  # one transaction for every blob that verified
    assert isinstance(results[7], VerificationError)
    assert [r.blob_id for r in results if isinstance(r, BlobInfo)] == \
        [c for i, c in enumerate(claimed) if i != 7]
    assert not store.has(claimed[7]) and not store.has(hash_bytes(blobs[7]))


async def test_read_small_reports_each_blob(store: Store) -> None:
    blobs = [payload(3000, seed=i) for i in range(3)]
    ids = [store.add_bytes(b).blob_id for b in blobs]
    sizes = await store.aio.complete_sizes([*ids, hash_bytes(b"absent")])
    assert sizes == {i: 3000 for i in ids}
    path = store.layout.data_path(ids[1])
    path.chmod(0o600)
    path.write_bytes(b"x" * 3000)  # rot
    store.layout.data_path(ids[2]).unlink()
    got = await store.aio.read_small([(i, sizes[i]) for i in ids], verify=True)
    assert got[0] == blobs[0]
    assert isinstance(got[1], CorruptBlobError) and isinstance(got[2], CorruptBlobError)
    assert (await store.aio.read_small([(ids[1], 3000)], verify=False)) == [b"x" * 3000]
