"""The hash tree: streaming, piece layers at any piece size, piece proofs and tampering."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blobmesh.errors import VerificationError
from blobmesh.hashing import (
    LEAF_SIZE,
    BlobId,
    PieceLayer,
    TreeHasher,
    hash_bytes,
    hash_stream,
    piece_count,
    verify_piece_proof,
)

KiB = 1024
PIECE_SIZES = [16 * KiB, 32 * KiB, 64 * KiB, 256 * KiB, 1024 * KiB]
# sizes around leaf, unit (256 KiB) and piece boundaries
SIZES = [0, 1, LEAF_SIZE - 1, LEAF_SIZE, LEAF_SIZE + 1, 5 * LEAF_SIZE + 3, 256 * KiB,
         256 * KiB + 1, 1024 * KiB + 16 * KiB + 5]
DATA = os.urandom(max(SIZES))


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 300 * KiB), cuts=st.lists(st.integers(0, 300 * KiB), max_size=12),
       piece_size=st.sampled_from([None, *PIECE_SIZES]))
def test_streaming_any_chunking_equals_one_shot(size: int, cuts: list[int],
                                                piece_size: int | None) -> None:
    data = DATA[:size]
    bounds = sorted({0, size, *(c for c in cuts if c <= size)})
    h = TreeHasher(piece_size)
    for a, b in itertools.pairwise(bounds):
        h.update(memoryview(data)[a:b])
    blob_id, layer = h.finalize()
    assert blob_id == hash_bytes(data)
    assert h.size == layer.size == size
    one_shot = hash_stream([data], piece_size)
    assert (blob_id, layer.hashes) == (one_shot[0], one_shot[1].hashes)


@pytest.mark.parametrize("size", SIZES)
def test_piece_layers_are_cuts_of_one_tree(size: int) -> None:
    data = DATA[:size]
    blob_id = hash_bytes(data)
    for piece_size in PIECE_SIZES:
        got, layer = hash_stream([data], piece_size)
        assert got == blob_id
        assert len(layer) == piece_count(size, piece_size)
        # the layer checks against the id alone, and every piece against the layer
        again = PieceLayer.from_bytes(blob_id, size, piece_size, layer.to_bytes())
        for i in range(len(again)):
            start, length = again.piece_range(i)
            again.verify_piece(i, data[start : start + length])
            verify_piece_proof(blob_id, size, piece_size, i, data[start : start + length],
                               again.proof(i))


def _layer(size: int = 1024 * KiB + 16 * KiB + 5, piece_size: int = 64 * KiB
           ) -> tuple[bytes, BlobId, PieceLayer]:
    data = DATA[:size]
    blob_id, layer = hash_stream([data], piece_size)
    return data, blob_id, layer


def _piece(data: bytes, layer: PieceLayer, i: int) -> bytes:
    start, length = layer.piece_range(i)
    return data[start : start + length]


def test_flipped_byte_in_a_piece_is_detected() -> None:
    data, blob_id, layer = _layer()
    for i in (0, 7, len(layer) - 1):
        piece = bytearray(_piece(data, layer, i))
        piece[len(piece) // 2] ^= 0x01
        assert not layer.check_piece(i, piece)
        with pytest.raises(VerificationError):
            verify_piece_proof(blob_id, layer.size, layer.piece_size, i, piece, layer.proof(i))
    assert hash_bytes(data[:-1] + bytes([data[-1] ^ 0x80])) != blob_id


def test_wrong_piece_hash_and_wrong_size_are_detected() -> None:
    data, blob_id, layer = _layer()
    hashes = list(layer.hashes)
    hashes[3] = bytes(32)
    with pytest.raises(VerificationError, match="does not match"):
        PieceLayer(blob_id, layer.size, layer.piece_size, hashes)
    for size in (layer.size - 1, layer.size + 1):  # same piece count, size bound in the root
        with pytest.raises(VerificationError, match="does not match"):
            PieceLayer(blob_id, size, layer.piece_size, layer.hashes)
    with pytest.raises(VerificationError, match="expected"):
        PieceLayer(blob_id, layer.size, layer.piece_size, layer.hashes[:-1])
    with pytest.raises(VerificationError, match="multiple of 32"):
        PieceLayer.from_bytes(blob_id, layer.size, layer.piece_size, layer.to_bytes()[:-1])
    # the same bytes claimed under another size do not prove into the id
    last = len(layer) - 1
    with pytest.raises(VerificationError):
        verify_piece_proof(blob_id, layer.size + 1, layer.piece_size, last,
                           _piece(data, layer, last) + b"\0", layer.proof(last))


def test_piece_of_wrong_length_or_index_is_rejected() -> None:
    data, _, layer = _layer()
    piece = _piece(data, layer, 0)
    with pytest.raises(VerificationError):
        layer.verify_piece(0, piece[:-1])
    with pytest.raises(VerificationError, match="out of range"):
        layer.verify_piece(len(layer), piece)
    assert not layer.check_piece(1, piece)  # right data, wrong place


Tamper = Callable[[list[bytes]], list[bytes]]


@pytest.mark.parametrize("tamper", [
    pytest.param(lambda p: p[:-1], id="truncated"),
    pytest.param(lambda p: p[1:], id="bottom-dropped"),
    pytest.param(lambda p: [*p, p[-1]], id="extended"),
    pytest.param(lambda p: [p[1], p[0], *p[2:]], id="swapped-siblings"),
    pytest.param(lambda p: [bytes(32), *p[1:]], id="zeroed-sibling"),
    pytest.param(lambda p: [*p[:-1], p[-1][:-1] + bytes([p[-1][-1] ^ 1])], id="flipped-bit"),
])
def test_tampered_proof_is_rejected(tamper: Tamper) -> None:
    data, blob_id, layer = _layer()
    for i in (0, 5, len(layer) - 2):  # the last piece's proof is a single sibling
        proof = layer.proof(i)
        assert len(proof) >= 2
        with pytest.raises(VerificationError):
            verify_piece_proof(blob_id, layer.size, layer.piece_size, i, _piece(data, layer, i),
                               tamper(proof))


def test_proof_for_another_index_is_rejected() -> None:
    data, blob_id, layer = _layer()
    with pytest.raises(VerificationError):
        verify_piece_proof(blob_id, layer.size, layer.piece_size, 2, _piece(data, layer, 2),
                           layer.proof(3))


def test_leaf_parent_and_root_are_domain_separated() -> None:
    # a two-leaf blob's parent node, fed back as a 64-byte "leaf", must not collide
    data = DATA[: 2 * LEAF_SIZE]
    _, layer = hash_stream([data], LEAF_SIZE)
    assert hash_bytes(b"".join(layer.hashes)) != hash_bytes(data)
    assert hash_bytes(b"") != hash_bytes(b"\0")


def test_invalid_piece_sizes() -> None:
    for bad in (0, LEAF_SIZE // 2, 3 * LEAF_SIZE, 100_000):
        with pytest.raises(ValueError, match="power of two"):
            TreeHasher(bad)
