"""The piece index: reusing identical pieces of stored blobs, bounded, never trusted blindly."""

from __future__ import annotations

import os
from pathlib import Path

from blobmesh.hashing import hash_stream
from blobmesh.store import LeaseId, Store
from blobmesh.store.piece_index import PieceIndex, fill_from_index

PIECE = 256 * 1024


def rewrite(data: bytes, pieces: list[int]) -> bytes:
    out = bytearray(data)
    for i in pieces:
        out[i * PIECE : (i + 1) * PIECE] = os.urandom(PIECE)
    return bytes(out)


def test_v2_reuses_every_unchanged_piece(tmp_path: Path) -> None:
    v1 = os.urandom(16 * PIECE + 1000)
    v2 = rewrite(v1, [0, 7, 15])
    with Store(tmp_path / "home") as store:
        store.add_bytes(v1)
        index = PieceIndex(store)
        _, layer = hash_stream([v2], PIECE)
        with store.begin_partial(layer, LeaseId.new("rx")) as partial:
            reused = fill_from_index(index, partial)
            assert reused.pieces == 17 - 3 and reused.bytes == 13 * PIECE + 1000
            assert sorted(partial.missing()) == [0, 7, 15]
            for i in partial.missing():
                start, length = layer.piece_range(i)
                partial.write_piece(i, v2[start : start + length])
        assert store.get_data(layer.blob_id, LeaseId.new("r")) == v2
        index.close()


def test_index_is_bounded_and_forgets_collected_blobs(tmp_path: Path) -> None:
    with Store(tmp_path / "home") as store:
        index = PieceIndex(store, max_pieces=20)
        old = store.add_bytes(os.urandom(12 * PIECE)).blob_id
        assert index.sync() == 1 and index.pieces == 12
        store.add_bytes(os.urandom(12 * PIECE))
        index.sync()
        assert index.pieces == 12  # the oldest blob made room
        assert index.sync() == 0  # and is not indexed again
        first = store.piece_layer(old).hashes[0]
        assert index.lookup(first) == []
        store.gc()
        index.sync()
        assert index.pieces == 0
        index.close()


def test_a_wrong_holder_costs_a_read_not_bad_data(tmp_path: Path) -> None:
    data = os.urandom(4 * PIECE)
    with Store(tmp_path / "home") as store:
        holder = store.add_bytes(data).blob_id
        index = PieceIndex(store)
        index.sync()
        # the holder's data rots on disk after it was indexed
        with open(store.layout.data_path(holder), "r+b") as f:
            f.write(b"rot")
        _, layer = hash_stream([data + b"tail"], PIECE)
        with store.begin_partial(layer, LeaseId.new("rx")) as partial:
            reused = fill_from_index(index, partial)
            assert reused.pieces == 3 and sorted(partial.missing()) == [0, 4]
        index.close()
