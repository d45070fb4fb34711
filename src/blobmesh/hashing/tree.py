"""The blobmesh content hash: a BLAKE3 Merkle tree over 16 KiB leaves (``docs/hashing.md``).

Leaves are hashed by the ``blake3`` extension; only the (small) tree above them is Python.
Every hash is a keyed BLAKE3 with a separate key per node kind, so a leaf can never pass for a
parent or a root, and the root binds the blob size.  The tree is *left-complete* (the left
subtree of a node over n leaves holds the largest power of two < n), which makes every aligned
power-of-two run of leaves a subtree: the *piece layer* at any piece size is a cut through the
same tree, so pieces can be verified one by one against the blob id whatever piece size a
transfer picks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import blake3

from blobmesh.errors import VerificationError
from blobmesh.hashing.ids import DIGEST_SIZE, BlobId

Buffer = bytes | bytearray | memoryview

LEAF_SIZE = 16 * 1024
MIN_PIECE_SIZE = 256 * 1024
MAX_PIECE_SIZE = 4 * 1024 * 1024
TARGET_MAX_PIECES = 4096


def _derive_key(purpose: str) -> bytes:
    context = f"blobmesh 2026-11 hash tree v1 {purpose}"
    digest: bytes = blake3.blake3(b"", derive_key_context=context).digest()
    return digest


LEAF_KEY = _derive_key("leaf")
PARENT_KEY = _derive_key("parent")
ROOT_KEY = _derive_key("root")


# Copying a keyed hasher is far cheaper than keying a new one: per 16 KiB leaf, keying cost
# a third of the hashing itself.  ``copy`` is thread-safe (the hasher holds a lock).
_LEAF_HASHER = blake3.blake3(key=LEAF_KEY)
_PARENT_HASHER = blake3.blake3(key=PARENT_KEY)


def leaf_hash(data: Buffer) -> bytes:
    """Hash one leaf (at most ``LEAF_SIZE`` bytes)."""
    h = _LEAF_HASHER.copy()
    h.update(data)
    out: bytes = h.digest()
    return out


def parent_hash(left: bytes, right: bytes) -> bytes:
    """Hash of an inner node over its two children."""
    h = _PARENT_HASHER.copy()
    h.update(left)
    h.update(right)
    out: bytes = h.digest()
    return out


def root_hash(size: int, top: bytes) -> BlobId:
    """Bind the blob size into the top node of the tree, giving the blob id."""
    return BlobId(blake3.blake3(size.to_bytes(8, "little") + top, key=ROOT_KEY).digest())


def _split(n: int) -> int:
    """Number of items in the left subtree of a left-complete tree over ``n`` items."""
    return 1 << ((n - 1).bit_length() - 1)


def tree_top(hashes: Sequence[bytes]) -> bytes:
    """Top node of the left-complete tree over ``hashes`` (leaf or piece hashes)."""
    if not hashes:
        raise ValueError("a tree has at least one node")
    level = list(hashes)
    # Pairing adjacent nodes level by level (carrying an odd last one up) builds exactly the
    # left-complete tree, without recursion.
    while len(level) > 1:
        nxt = [parent_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def leaf_count(size: int) -> int:
    """Leaves of a blob of ``size`` bytes (the empty blob has one empty leaf)."""
    return max(1, -(-size // LEAF_SIZE))


def piece_count(size: int, piece_size: int) -> int:
    """Pieces of a blob of ``size`` bytes (the empty blob has one empty piece)."""
    return max(1, -(-size // piece_size))


def check_piece_size(piece_size: int) -> None:
    """Raise ``ValueError`` unless ``piece_size`` is a power of two of at least one leaf."""
    if piece_size < LEAF_SIZE or piece_size & (piece_size - 1):
        raise ValueError(f"piece size must be a power of two >= {LEAF_SIZE}, got {piece_size}")


def choose_piece_size(size: int) -> int:
    """Default piece size: the smallest in [256 KiB, 4 MiB] giving at most 4096 pieces."""
    piece = MIN_PIECE_SIZE
    while piece < MAX_PIECE_SIZE and piece_count(size, piece) > TARGET_MAX_PIECES:
        piece *= 2
    return piece


def piece_range(size: int, piece_size: int, index: int) -> tuple[int, int]:
    """Byte offset and length of piece ``index``."""
    start = index * piece_size
    return start, max(0, min(piece_size, size - start))


def hash_piece(data: Buffer) -> bytes:
    """Hash of the subtree over one piece's data (its node in the piece layer)."""
    mv = memoryview(data)
    if len(mv) <= LEAF_SIZE:
        return leaf_hash(mv)
    return tree_top([leaf_hash(mv[i : i + LEAF_SIZE]) for i in range(0, len(mv), LEAF_SIZE)])


def hash_bytes(data: Buffer) -> BlobId:
    """Blob id of an in-memory byte string."""
    return root_hash(len(data), hash_piece(data))


def root_from_pieces(size: int, piece_hashes: Sequence[bytes]) -> BlobId:
    """Blob id from a piece layer (at any piece size) and the size."""
    return root_hash(size, tree_top(piece_hashes))


class PieceLayer:
    """The piece hashes of one blob at one piece size, verified against its blob id."""

    __slots__ = ("blob_id", "hashes", "piece_size", "size")

    def __init__(self, blob_id: BlobId, size: int, piece_size: int, hashes: Sequence[bytes]):
        check_piece_size(piece_size)
        if size < 0:
            raise ValueError("negative size")
        if len(hashes) != piece_count(size, piece_size):
            raise VerificationError(
                f"piece layer of {blob_id.short()} has {len(hashes)} hashes, "
                f"expected {piece_count(size, piece_size)}", blob_id=blob_id)
        if any(len(h) != DIGEST_SIZE for h in hashes):
            raise VerificationError("piece hash of wrong length", blob_id=blob_id)
        if root_from_pieces(size, hashes) != blob_id:
            raise VerificationError(
                f"piece layer does not match blob {blob_id.short()} (size {size})",
                blob_id=blob_id)
        self.blob_id = blob_id
        self.size = size
        self.piece_size = piece_size
        self.hashes: tuple[bytes, ...] = tuple(hashes)

    @classmethod
    def from_bytes(cls, blob_id: BlobId, size: int, piece_size: int, raw: bytes) -> PieceLayer:
        """Parse concatenated 32-byte hashes (the ``.pieces`` file) and verify them."""
        if len(raw) % DIGEST_SIZE:
            raise VerificationError("piece layer length is not a multiple of 32", blob_id=blob_id)
        hashes = [raw[i : i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE)]
        return cls(blob_id, size, piece_size, hashes)

    def to_bytes(self) -> bytes:
        return b"".join(self.hashes)

    def __len__(self) -> int:
        return len(self.hashes)

    def piece_range(self, index: int) -> tuple[int, int]:
        return piece_range(self.size, self.piece_size, index)

    def verify_piece(self, index: int, data: Buffer) -> None:
        """Raise :class:`VerificationError` unless ``data`` is exactly piece ``index``."""
        if not 0 <= index < len(self.hashes):
            raise VerificationError(f"piece index {index} out of range", blob_id=self.blob_id)
        _, length = self.piece_range(index)
        if len(data) != length or hash_piece(data) != self.hashes[index]:
            raise VerificationError(
                f"piece {index} of {self.blob_id.short()} failed verification",
                blob_id=self.blob_id, piece=index)

    def check_piece(self, index: int, data: Buffer) -> bool:
        """Whether ``data`` is exactly piece ``index``."""
        try:
            self.verify_piece(index, data)
        except VerificationError:
            return False
        return True

    def proof(self, index: int) -> list[bytes]:
        """The proof of piece ``index`` (see :func:`verify_piece_proof`)."""
        return subtree_proof(self.hashes, index)


def subtree_proof(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Sibling hashes, bottom-up, proving ``hashes[index]`` under :func:`tree_top`."""
    if not 0 <= index < len(hashes):
        raise IndexError(index)
    proof: list[bytes] = []
    lo, hi = 0, len(hashes)
    while hi - lo > 1:
        mid = lo + _split(hi - lo)
        if index < mid:
            proof.append(tree_top(hashes[mid:hi]))
            hi = mid
        else:
            proof.append(tree_top(hashes[lo:mid]))
            lo = mid
    proof.reverse()
    return proof


def top_from_proof(count: int, index: int, node: bytes, proof: Sequence[bytes]) -> bytes:
    """Recompute the tree top from one node and its proof; raises on a malformed proof."""
    if not 0 <= index < count:
        raise VerificationError(f"index {index} out of range for {count} nodes")
    sides: list[bool] = []  # True when our node is in the left subtree at that level
    lo, hi = 0, count
    while hi - lo > 1:
        mid = lo + _split(hi - lo)
        sides.append(index < mid)
        lo, hi = (lo, mid) if index < mid else (mid, hi)
    if len(sides) != len(proof):
        raise VerificationError(f"proof has {len(proof)} hashes, expected {len(sides)}")
    for is_left, sibling in zip(reversed(sides), proof, strict=True):
        node = parent_hash(node, sibling) if is_left else parent_hash(sibling, node)
    return node


def verify_piece_proof(blob_id: BlobId, size: int, piece_size: int, index: int,
                       data: Buffer, proof: Sequence[bytes]) -> None:
    """Verify one piece against the blob id alone, given its proof (a range proof)."""
    check_piece_size(piece_size)
    _, length = piece_range(size, piece_size, index)
    if len(data) != length:
        raise VerificationError(f"piece {index} has {len(data)} bytes, expected {length}")
    top = top_from_proof(piece_count(size, piece_size), index, hash_piece(data), proof)
    if root_hash(size, top) != blob_id:
        raise VerificationError(f"piece {index} does not prove into {blob_id.short()}",
                                blob_id=blob_id, piece=index)


class TreeHasher:
    """Streaming hasher: feed bytes in any chunking, get the blob id and its piece layer.

    Memory is one piece of buffered data at most plus 32 bytes per piece.
    """

    def __init__(self, piece_size: int | None = None) -> None:
        if piece_size is not None:
            check_piece_size(piece_size)
        self._fixed_piece_size = piece_size
        # Leaves are grouped into "units" of MIN_PIECE_SIZE; pieces of any larger size are
        # built from units afterwards, so the piece size can be picked once the size is known.
        self._unit = min(piece_size or MIN_PIECE_SIZE, MIN_PIECE_SIZE)
        self._units: list[bytes] = []
        self._leaves: list[bytes] = []
        self._buf = bytearray()
        self.size = 0

    def update(self, data: Buffer) -> None:
        mv = memoryview(data).cast("B")
        self.size += len(mv)
        if self._buf:
            need = LEAF_SIZE - len(self._buf)
            self._buf += mv[:need]
            mv = mv[need:]
            if len(self._buf) < LEAF_SIZE:
                return
            self._add_leaf(leaf_hash(self._buf))
            self._buf.clear()
        full = len(mv) - len(mv) % LEAF_SIZE
        add = self._add_leaf
        for i in range(0, full, LEAF_SIZE):
            add(leaf_hash(mv[i : i + LEAF_SIZE]))
        if full < len(mv):
            self._buf += mv[full:]

    def _add_leaf(self, h: bytes) -> None:
        self._leaves.append(h)
        if len(self._leaves) * LEAF_SIZE == self._unit:
            self._units.append(tree_top(self._leaves))
            self._leaves.clear()

    def finalize(self) -> tuple[BlobId, PieceLayer]:
        """Finish hashing; returns the blob id and the piece layer (verified)."""
        if self._buf or (not self._leaves and not self._units):
            self._leaves.append(leaf_hash(self._buf))
            self._buf.clear()
        if self._leaves:
            self._units.append(tree_top(self._leaves))
            self._leaves.clear()
        piece_size = self._fixed_piece_size or choose_piece_size(self.size)
        per_piece = piece_size // self._unit
        units = self._units
        pieces = [tree_top(units[i : i + per_piece]) for i in range(0, len(units), per_piece)]
        blob_id = root_from_pieces(self.size, pieces)
        return blob_id, PieceLayer(blob_id, self.size, piece_size, pieces)


def hash_stream(chunks: Iterable[Buffer], piece_size: int | None = None
                ) -> tuple[BlobId, PieceLayer]:
    """Blob id and piece layer (default piece size unless given) of a chunked input."""
    h = TreeHasher(piece_size)
    for chunk in chunks:
        h.update(chunk)
    return h.finalize()
