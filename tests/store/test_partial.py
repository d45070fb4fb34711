"""Partial blobs: verified pieces in any order, resumption, completion, GC grace."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
from pathlib import Path

import pytest

from blobmesh.errors import BlobIncompleteError, VerificationError
from blobmesh.hashing import PieceLayer, hash_stream
from blobmesh.store import LeaseId, Store
from blobmesh.store import partial as partial_module
from tests.store.helpers import payload

PIECE = 256 * 1024
DATA = payload(7 * PIECE + 1234, seed=7)


def _layer(data: bytes = DATA, piece_size: int = PIECE) -> PieceLayer:
    return hash_stream([data], piece_size)[1]


def _piece(layer: PieceLayer, i: int, data: bytes = DATA) -> bytes:
    start, length = layer.piece_range(i)
    return data[start : start + length]


def test_pieces_in_any_order_complete_the_blob(store: Store) -> None:
    layer = _layer()
    order = list(range(len(layer)))
    random.Random(1).shuffle(order)
    with store.begin_partial(layer, LeaseId.new("rx")) as partial:
        for n, i in enumerate(order):
            assert partial.write_piece(i, _piece(layer, i))
            assert not partial.write_piece(i, _piece(layer, i))  # already there
            assert partial.is_complete() == (n == len(order) - 1)
            if n == 4:  # five pieces, the short last one among them
                assert len(layer) - 1 in order[:5]
                partial.flush()
                info = store.info(layer.blob_id)
                assert (info.complete, info.pieces_present) == (False, 5)
                assert info.bytes_present == sum(len(_piece(layer, i)) for i in order[:5])
                assert set(store.bitfield(layer.blob_id)) == set(order[:5])
                with pytest.raises(BlobIncompleteError):
                    store.get_reader(layer.blob_id, LeaseId.new("r"))
                assert store.read_piece(layer.blob_id, order[0]) == _piece(layer, order[0])
                with pytest.raises(BlobIncompleteError):
                    store.read_piece(layer.blob_id, order[5])
    assert store.info(layer.blob_id).complete
    assert store.get_data(layer.blob_id, LeaseId.new("r")) == DATA
    assert store.fsck().ok


def test_wrong_piece_is_rejected_and_not_written(store: Store) -> None:
    layer = _layer()
    with store.begin_partial(layer, LeaseId.new("rx")) as partial:
        bad = bytearray(_piece(layer, 2))
        bad[0] ^= 0xFF
        with pytest.raises(VerificationError):
            partial.write_piece(2, bad)
        with pytest.raises(VerificationError):
            partial.write_piece(3, _piece(layer, 2))
        with pytest.raises(VerificationError):
            partial.write_piece(len(layer), b"")
        assert partial.missing() == list(range(len(layer)))
    assert store.info(layer.blob_id).pieces_present == 0
    with open(store.layout.data_path(layer.blob_id), "rb") as f:
        assert f.read() == bytes(len(DATA))  # nothing of the bad pieces reached the disk


def test_resume_after_reopening_the_store(home: Path) -> None:
    layer = _layer()
    with Store(home) as store, store.begin_partial(layer, LeaseId.named("rx")) as partial:
        for i in (0, 5, len(layer) - 1):
            partial.write_piece(i, _piece(layer, i))
    with Store(home) as store:
        assert store.gc().deleted == []  # the lease is ours, and the partial is fresh
        with store.begin_partial(layer, LeaseId.named("rx")) as partial:
            assert set(partial.have) == {0, 5, len(layer) - 1}
            for i in partial.missing():
                partial.write_piece(i, _piece(layer, i))
        assert store.get_data(layer.blob_id, LeaseId.new("r")) == DATA


def test_pieces_become_present_every_flush_bytes(store: Store,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partial_module, "FLUSH_BYTES", 2 * PIECE)
    layer = _layer()
    with store.begin_partial(layer, LeaseId.new("rx")) as partial:
        present = []
        for i in range(5):
            partial.write_piece(i, _piece(layer, i))
            present.append(store.info(layer.blob_id).pieces_present)
    assert present == [0, 2, 2, 4, 4]
    assert store.info(layer.blob_id).pieces_present == 5


def test_concurrent_flushes(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: two flushes of the same pending pieces raced (KeyError, lost pieces)."""
    layer = _layer()
    partial = store.begin_partial(layer, LeaseId.new("rx"))
    for i in range(3):
        partial.write_piece(i, _piece(layer, i))
    both_inside = threading.Barrier(2)
    real_fdatasync = os.fdatasync

    def meet_then_sync(fd: int) -> None:
        # without mutual exclusion both flushes get here with the same pending pieces
        with contextlib.suppress(threading.BrokenBarrierError):
            both_inside.wait(timeout=0.5)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", meet_then_sync)
    errors: list[BaseException] = []

    def flush() -> None:
        try:
            partial.flush()
        except Exception as exc:  # re-raised in the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=flush) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert set(store.bitfield(layer.blob_id)) == {0, 1, 2}
    partial.close()


def test_two_copies_of_a_piece_written_at_once_count_once(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: two threads writing the same piece (an end-game duplicate) both got True,
    so the swarm counted the piece's bytes twice (progress above the blob's size)."""
    layer = _layer()
    partial = store.begin_partial(layer, LeaseId.new("rx"))
    both_inside = threading.Barrier(2)
    real_pwrite = os.pwrite

    def meet_then_write(fd: int, data: bytes, offset: int) -> int:
        # without a claim under the lock both writers get here for the same piece
        with contextlib.suppress(threading.BrokenBarrierError):
            both_inside.wait(timeout=0.5)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", meet_then_write)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(
        partial.write_piece(3, _piece(layer, 3)))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]
    assert 3 in partial.have
    partial.close()


def test_close_waits_for_a_write_under_way(store: Store,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the second copy of an end-game piece returns "not new" while the first is
    still being written; the swarm then closed the partial, which committed without that
    piece ("incomplete after all pieces arrived")."""
    layer = _layer()
    partial = store.begin_partial(layer, LeaseId.new("rx"))
    for i in range(len(layer.hashes)):
        if i != 3:
            assert partial.write_piece(i, _piece(layer, i))
    inside, release = threading.Event(), threading.Event()
    real_pwrite = os.pwrite

    def slow_write(fd: int, data: bytes, offset: int) -> int:
        inside.set()
        release.wait(5)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", slow_write)
    first = threading.Thread(target=partial.write_piece, args=(3, _piece(layer, 3)))
    first.start()
    assert inside.wait(5)
    assert partial.write_piece(3, _piece(layer, 3)) is False  # the copy: "not new"
    closing = threading.Thread(target=partial.close)
    closing.start()
    closing.join(0.2)
    assert closing.is_alive()  # waits for the write under way
    release.set()
    first.join(5)
    closing.join(5)
    assert store.has(layer.blob_id)


def test_no_write_starts_once_close_began(store: Store) -> None:
    """A write claimed after close waited for the writes under way must not reach the
    descriptor being closed (its number may already name another file)."""
    layer = _layer()
    partial = store.begin_partial(layer, LeaseId.new("rx"))
    assert partial.write_piece(0, _piece(layer, 0))
    partial.close()
    with pytest.raises(OSError) as info:
        partial.write_piece(1, _piece(layer, 1))
    assert info.value.errno == errno.EBADF
    assert not partial.write_piece(0, _piece(layer, 0))  # present: still "not new"
    assert set(store.bitfield(layer.blob_id)) == {0}


def test_two_writers_share_progress(store: Store) -> None:
    layer = _layer()
    a = store.begin_partial(layer, LeaseId.new("a"))
    b = store.begin_partial(layer, LeaseId.new("b"))
    for i in range(0, len(layer), 2):
        a.write_piece(i, _piece(layer, i))
    a.flush()
    assert b.flush() == a.have  # b sees what a made durable
    for i in b.missing():
        b.write_piece(i, _piece(layer, i))
    a.close()
    b.close()
    assert store.info(layer.blob_id).complete


def test_existing_blob_keeps_its_layer(store: Store) -> None:
    layer = _layer()
    with store.begin_partial(layer, LeaseId.new("rx")) as partial:
        partial.write_piece(1, _piece(layer, 1))
    other = _layer(piece_size=4 * PIECE)
    with store.begin_partial(other, LeaseId.new("rx")) as partial:
        assert partial.layer.piece_size == PIECE and set(partial.have) == {1}


def test_add_completes_a_partial(store: Store) -> None:
    layer = _layer(piece_size=2 * PIECE)  # the add would pick 256 KiB pieces
    with store.begin_partial(layer, LeaseId.new("rx")) as partial:
        partial.write_piece(0, _piece(layer, 0))
    info = store.add_bytes(DATA)
    assert (info.complete, info.piece_size) == (True, 2 * PIECE)
    assert store.get_data(layer.blob_id, LeaseId.new("r")) == DATA
    assert store.fsck().ok


def test_empty_blob_as_partial(store: Store) -> None:
    layer = _layer(b"")
    with store.begin_partial(layer, LeaseId.new("rx")) as partial:
        assert partial.write_piece(0, b"")
    assert store.get_data(layer.blob_id, LeaseId.new("r")) == b""


def test_gc_keeps_fresh_partials_and_drops_old_ones(store: Store) -> None:
    layer = _layer()
    lease = LeaseId.new("rx")
    with store.begin_partial(layer, lease) as partial:
        partial.write_piece(0, _piece(layer, 0))
    store.advise_lease_dropped(lease, layer.blob_id)
    report = store.gc()
    assert report.deleted == [] and report.kept == 1
    assert store.gc(partial_grace=3600).deleted == []
    report = store.gc(partial_grace=0)
    assert report.deleted == [layer.blob_id]
    assert not store.layout.data_path(layer.blob_id).exists()


def test_pinned_partial_survives_gc(store: Store) -> None:
    layer = _layer()
    lease = LeaseId.new("rx")
    store.begin_partial(layer, lease).close()
    store.pin(layer.blob_id, "incoming")
    store.advise_lease_dropped(lease, layer.blob_id)
    assert store.gc(partial_grace=0).deleted == []
