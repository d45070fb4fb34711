"""Adding (every source kind, dedup, errors) and reading (readers, ranges, verification)."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from blobmesh.errors import (
    BlobIncompleteError,
    BlobNotFoundError,
    CorruptBlobError,
    SourceError,
    VerificationError,
)
from blobmesh.hashing import BlobId, hash_bytes
from blobmesh.store import BlobInfo, LeaseId, Store
from blobmesh.store import ingest as store_module
from blobmesh.store.store import AddSource
from tests.store.helpers import flip_byte, payload, truncate

DATA = payload(3 * 1024 * 1024 + 12_345)  # > 1 MiB chunks take the threaded hashing path


async def _agen(data: bytes, step: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i : i + step]


def _add_path(store: Store, data: bytes, tmp: Path) -> BlobInfo:
    src = tmp / "src.bin"
    src.write_bytes(data)
    return store.add_path(src, LeaseId.new("t"))


def _add_file_object(store: Store, data: bytes, tmp: Path) -> BlobInfo:
    return store.add_stream(io.BytesIO(data), LeaseId.new("t"))


def _add_iterable(store: Store, data: bytes, tmp: Path) -> BlobInfo:
    return store.add_stream(data[i : i + 70_001] for i in range(0, len(data), 70_001))


def _add_async(store: Store, data: bytes, tmp: Path) -> BlobInfo:
    import asyncio

    return asyncio.run(store.add_async_stream(_agen(data, 1 << 20), LeaseId.new("t")))


def _add_bytes(store: Store, data: bytes, tmp: Path) -> BlobInfo:
    return store.add_bytes(bytearray(data))


Adder = Callable[[Store, bytes, Path], BlobInfo]


@pytest.mark.parametrize("adder", [_add_path, _add_file_object, _add_iterable, _add_async,
                                   _add_bytes])
@pytest.mark.parametrize("size", [0, 1, 16385, len(DATA)])
def test_add_every_source(store: Store, tmp_path: Path, adder: Adder, size: int) -> None:
    data = DATA[:size]
    info = adder(store, data, tmp_path)
    assert info.blob_id == hash_bytes(data)
    assert (info.size, info.bytes_present, info.complete, info.pieces_present) == \
        (size, size, True, info.pieces_total)
    assert store.get_data(info.blob_id, LeaseId.new("r")) == data
    assert store.fsck().ok
    assert not any(store.layout.tmp.iterdir())


@pytest.mark.parametrize("adder", [_add_path, _add_file_object, _add_iterable])
def test_many_chunks_hashed_while_reading(store: Store, tmp_path: Path, adder: Adder,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Small chunks: reading the next one overlaps hashing the last (two buffers in turn)."""
    monkeypatch.setattr(store_module, "CHUNK", store_module.OVERLAP_MIN)
    info = adder(store, DATA, tmp_path)
    assert info.blob_id == hash_bytes(DATA)
    assert store.read_range(info.blob_id, 0, len(DATA), verify=True) == DATA


def test_dedup_keeps_one_copy(store: Store) -> None:
    a = store.add_bytes(DATA, LeaseId.new("a"))
    b = store.add_stream(io.BytesIO(DATA), LeaseId.new("b"))
    assert a.blob_id == b.blob_id
    assert [i.blob_id for i in store.blobs()] == [a.blob_id]
    assert b.leases == 2
    assert not any(store.layout.tmp.iterdir())


def test_progress_counts_every_byte(store: Store) -> None:
    seen: list[int] = []
    store.add_stream(io.BytesIO(DATA), progress=seen.append)
    assert sum(seen) == len(DATA)


def test_add_path_errors(store: Store, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        store.add_path(tmp_path / "missing")
    with pytest.raises(SourceError, match="is a directory"):
        store.add_path(tmp_path)
    assert store.blobs() == []


def test_failing_source_leaves_nothing(store: Store) -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: object) -> int:
            raise OSError(5, "Input/output error")

    with pytest.raises(SourceError, match="reading the input failed"):
        store.add_stream(Broken())
    assert store.blobs() == [] and not any(store.layout.tmp.iterdir())


def test_reader_is_a_seekable_raw_file(store: Store) -> None:
    blob_id = store.add_bytes(DATA).blob_id
    with store.get_reader(blob_id, LeaseId.new("r"), verify=True) as r:
        assert isinstance(r, io.RawIOBase) and r.readable() and r.seekable()
        assert r.seek(1000) == 1000 and r.tell() == 1000
        assert r.read(10) == DATA[1000:1010] and r.tell() == 1010
        assert r.seek(-5, os.SEEK_CUR) == 1005
        buf = bytearray(300_000)
        assert r.readinto(buf) == len(buf) and bytes(buf) == DATA[1005:301_005]
        assert r.seek(-7, os.SEEK_END) == len(DATA) - 7
        assert r.read() == DATA[-7:]
        assert r.read(10) == b"" and r.readinto(bytearray(4)) == 0
        r.seek(len(DATA) + 100)
        assert r.read(1) == b""
        with pytest.raises(ValueError):
            r.seek(-1)
        with pytest.raises(ValueError):
            r.seek(0, 7)
    with pytest.raises(ValueError):
        r.read(1)
    with pytest.raises(ValueError):
        r.seek(0)


def test_buffered_reader_wrapping(store: Store) -> None:
    blob_id = store.add_bytes(DATA).blob_id
    with io.BufferedReader(store.get_reader(blob_id, LeaseId.new("r")), 8192) as f:
        assert f.read(5) == DATA[:5]
        assert f.peek(3)[:3] == DATA[5:8]
        f.seek(2_000_000)
        assert f.read(100) == DATA[2_000_000:2_000_100]
        assert f.tell() == 2_000_100
        f.seek(-50, os.SEEK_END)
        assert f.read() == DATA[-50:]
        lines = io.BufferedReader(store.get_reader(blob_id, LeaseId.new("r"))).readlines()
        assert b"".join(lines) == DATA


@pytest.mark.parametrize(("offset", "length"), [(0, 0), (0, 1), (262_143, 2), (1_000_000, 5000),
                                                 (len(DATA) - 3, 10), (len(DATA) + 5, 10)])
def test_range_reads(store: Store, offset: int, length: int) -> None:
    blob_id = store.add_bytes(DATA).blob_id
    for verify in (False, True):
        assert store.read_range(blob_id, offset, length, verify=verify) == \
            DATA[offset : offset + length]


def test_one_off_reads_leave_no_lease(store: Store, tmp_path: Path) -> None:
    """Regression: read_range and export each left a lease behind for the process's life."""
    blob_id = store.add_bytes(DATA).blob_id
    store.read_range(blob_id, 5, 5)
    store.export(blob_id, tmp_path / "out")
    with store.get_reader(blob_id, None) as r:
        assert store.info(blob_id).leases == 1  # the reader's own hold
        assert r.read(3) == DATA[:3]
    assert store.info(blob_id).leases == 0
    assert store.gc().deleted == [blob_id]


def test_read_piece(store: Store) -> None:
    info = store.add_bytes(DATA)
    layer = store.piece_layer(info.blob_id)
    last = len(layer) - 1
    start, length = layer.piece_range(last)
    assert store.read_piece(info.blob_id, last) == DATA[start : start + length]
    with pytest.raises(BlobIncompleteError):
        store.read_piece(info.blob_id, last + 1)


def test_verified_read_detects_bit_flip(store: Store) -> None:
    blob_id = store.add_bytes(DATA).blob_id
    flip_byte(store, blob_id, 2_500_000)
    assert store.read_range(blob_id, 0, 1000, verify=True) == DATA[:1000]  # other pieces fine
    with pytest.raises(CorruptBlobError, match="corrupt on disk"):
        store.get_data(blob_id, LeaseId.new("r"))
    with pytest.raises(CorruptBlobError):
        store.read_range(blob_id, 2_500_000, 1, verify=True)
    with pytest.raises(CorruptBlobError):
        store.read_piece(blob_id, 2_500_000 // store.info(blob_id).piece_size)
    # unverified reads return what is on disk
    assert store.get_data(blob_id, LeaseId.new("r"), verify=False) != DATA


@pytest.mark.parametrize("verify", [False, True])
def test_read_detects_truncation(store: Store, verify: bool) -> None:
    blob_id = store.add_bytes(DATA).blob_id
    truncate(store, blob_id, len(DATA) - 100)
    with pytest.raises(CorruptBlobError):
        store.get_data(blob_id, LeaseId.new("r"), verify=verify)


def test_missing_data_file_is_corruption(store: Store) -> None:
    blob_id = store.add_bytes(DATA).blob_id
    store.layout.data_path(blob_id).unlink()
    with pytest.raises(CorruptBlobError, match="missing"):
        store.get_reader(blob_id, LeaseId.new("r"))
    assert store.info(blob_id).leases == 1  # the reader's own hold was released


def test_seed_api(store: Store) -> None:
    lease = LeaseId.new("seed")
    blob_id = store.store(DATA, lease, expected=hash_bytes(DATA))
    assert store.get_data(blob_id, lease) == DATA
    with pytest.raises(VerificationError):
        store.store(b"other", lease, expected=blob_id)
    unknown = BlobId(bytes(32))
    with pytest.raises(BlobNotFoundError):
        store.lease_by_content(unknown, lease)
    with pytest.raises(BlobNotFoundError):
        store.get_reader(unknown, lease)
    assert not store.has(unknown) and store.has(blob_id)


def test_export_is_verified_and_atomic(store: Store, tmp_path: Path) -> None:
    blob_id = store.add_bytes(DATA).blob_id
    dest = tmp_path / "out.bin"
    store.export(blob_id, dest)
    assert dest.read_bytes() == DATA
    flip_byte(store, blob_id, 10)
    dest2 = tmp_path / "out2.bin"
    with pytest.raises(CorruptBlobError):
        store.export(blob_id, dest2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "out.bin"]


def test_add_many_bytes_and_paths_in_one_commit(store: Store, tmp_path: Path) -> None:
    files = []
    for i in range(3):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(payload(1000 * i + 1, seed=i))
    lease = LeaseId.new("many")
    sources: list[AddSource] = [DATA, *files, str(files[0]), DATA[:10]]  # dups stored once
    infos = store.add_many(sources, lease)
    contents = [DATA, *(f.read_bytes() for f in files), files[0].read_bytes(), DATA[:10]]
    assert [i.blob_id for i in infos] == [hash_bytes(c) for c in contents]
    assert len(store.blobs()) == 5 and all(i.complete for i in infos)
    for info, content in zip(infos, contents, strict=True):
        assert store.get_data(info.blob_id, lease) == content
    assert store.fsck().ok and not any(store.layout.tmp.iterdir())


def test_add_many_is_all_or_nothing(store: Store, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        store.add_many([DATA, tmp_path / "missing", b"more"])
    assert store.blobs() == [] and not any(store.layout.tmp.iterdir())


def test_content_from_memory_keeps_its_layer_in_the_database(store: Store) -> None:
    """A small blob added from memory is one file: its piece layer is a row of ``layers``
    (served, checked and collected with the blob); a streamed one keeps its layer file."""
    held = payload(600_000, seed=4)  # three pieces
    blob_id = store.add_many([held], LeaseId.new("t"))[0].blob_id
    streamed = store.add_stream([payload(5000, seed=5)]).blob_id
    assert not store.layout.pieces_path(blob_id).exists()
    assert store.layout.pieces_path(streamed).exists()
    layer = store.piece_layer(blob_id)
    assert len(layer) == 3 and layer.blob_id == blob_id
    assert store.read_piece(blob_id, 2, verify=True) == held[512 * 1024 :]
    assert store.get_data(blob_id, LeaseId.new("r"), verify=True) == held
    with store.db.write() as db:  # a damaged row is caught like a damaged file
        db.execute("UPDATE layers SET hashes=zeroblob(96) WHERE id=?", (blob_id.digest,))
    with pytest.raises(CorruptBlobError, match="piece layer"):
        store.piece_layer(blob_id)
    store.advise_pid_terminated(os.getpid())
    assert set(store.gc().deleted) == {blob_id, streamed}
    assert store.db.query("SELECT count(*) FROM layers") == [(0,)]  # gone with its row


def test_a_store_of_a_later_format_is_refused(home: Path) -> None:
    import sqlite3

    from blobmesh.errors import StoreError
    from blobmesh.store.db import FORMAT

    Store(home).close()
    db = sqlite3.connect(home / "store.sqlite")
    assert db.execute("PRAGMA user_version").fetchone() == (FORMAT,)
    db.execute(f"PRAGMA user_version={FORMAT + 1}")
    db.close()
    with pytest.raises(StoreError, match=f"format {FORMAT + 1}"):
        Store(home)


def test_inline_blobs_are_rows_served_like_files(store: Store, tmp_path: Path) -> None:
    """``add_many(inline=True)`` keeps small contents in the database: no file at all, and
    every reader, fsck, quarantine and GC handle them as they handle files."""
    from blobmesh.store import PieceReader

    datas = [payload(300_000, seed=1), payload(16_384, seed=2), b""]
    lease = LeaseId.new("t")
    ids = [i.blob_id for i in store.add_many(datas, lease, inline=True)]
    assert not any(store.layout.blobs.iterdir())
    assert store.add_many(datas, lease, inline=True)[0].complete  # again: only leased
    big = ids[0]
    with store.get_reader(big, None, verify=True) as r:
        r.seek(262_140)
        assert r.read(10) == datas[0][262_140:262_150]
        buf = bytearray(5)
        r.seek(0)
        assert r.readinto(buf) == 5 and bytes(buf) == datas[0][:5]
    assert store.read_piece(big, 1) == datas[0][256 * 1024 :]
    assert store.get_data(ids[2], lease) == b""
    reader = PieceReader(store, store.piece_layer(big), verify=True)
    assert reader.read_many([1, 0]) == [datas[0][256 * 1024 :], datas[0][: 256 * 1024]]
    reader.close()
    with pytest.raises(BlobIncompleteError, match="closed"):
        reader.read(0)
    store.export(ids[1], tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == datas[1]
    assert store.fsck().ok
    with store.db.write() as db:  # rot inside the database
        db.execute("UPDATE contents SET data=? WHERE id=?",
                   (b"x" * len(datas[1]), ids[1].digest))
    with pytest.raises(CorruptBlobError):
        store.get_data(ids[1], lease, verify=True)
    assert [(p.kind, p.blob_id) for p in store.fsck().problems] == [("corrupt", ids[1])]
    store.fsck(repair=True)
    assert not store.has(ids[1])
    assert [p.read_bytes() for p in store.layout.quarantine.iterdir()] == [b"x" * 16_384]
    store.advise_pid_terminated(os.getpid())
    assert set(store.gc().deleted) == {ids[0], ids[2]}
    assert store.db.query("SELECT count(*) FROM contents") == [(0,)]


def test_a_partial_writer_of_an_inline_blob_gets_a_data_file(store: Store) -> None:
    from blobmesh.hashing import hash_stream

    data = payload(40_000, seed=6)
    blob_id = store.add_many([data], inline=True)[0].blob_id
    with store.begin_partial(hash_stream([data])[1], LeaseId.new("rx")) as partial:
        assert partial.is_complete()
    assert store.layout.data_path(blob_id).read_bytes() == data
    assert store.db.content(blob_id) is None  # moved out of the database
    assert store.get_data(blob_id, LeaseId.new("r"), verify=True) == data
    assert store.fsck().ok
