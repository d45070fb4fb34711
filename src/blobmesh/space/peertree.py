"""The peer-record summary anti-entropy compares: a prefix tree over node ids (pure, no I/O).

Every record contributes one *entry*, ``(node id, created_at)``, hashed with a keyed BLAKE3
(:func:`entry_hash`).  A *prefix* names the node ids starting with some number of 4-bit digits;
it is encoded as one int, ``1 << 4·depth | digits`` (the leading 1 marks the depth: the root is
1, its children ``0x10 … 0x1f``, theirs ``0x100 … 0x1ff``), down to :data:`MAX_DEPTH`.  The
digest of a prefix is the XOR of the first 8 bytes of its entries' hashes (the root's, sent in
``g-hello``, of all 32 bytes), kept current in O(depth) per change, so both sides can compare
any subtree without sorting or rehashing what they hold.

Two nodes whose roots differ compare the 16 children of each differing prefix (``g-tree``)
until a prefix holds at most :data:`LEAF` entries on the initiator's side (or is
:data:`MAX_DEPTH` deep); only the entries of those prefixes are then listed.  A round thus
costs about ``changes × depth × 16 × 8`` bytes instead of every entry held.
"""

from __future__ import annotations

from typing import Protocol

import blake3

DIGIT_BITS = 4
FANOUT = 1 << DIGIT_BITS
MAX_DEPTH = 6                    # 24 bits of the node id: 16.7 million leaves
KEY_BITS = DIGIT_BITS * MAX_DEPTH
DIGEST_BYTES = 8                 # per child in g-tree-digests
LEAF = 8                         # a prefix with at most this many entries is listed, not split
ROOT = 1
_KEY = blake3.blake3(b"blobmesh/space/peer-entry/v1").digest()


def entry_hash(node: bytes, created_at: int) -> int:
    """The 256-bit hash of one record's entry (keyed BLAKE3 of ``node ‖ created_at``)."""
    raw = blake3.blake3(node + created_at.to_bytes(8, "big", signed=True), key=_KEY).digest()
    return int.from_bytes(raw, "big")


def depth(prefix: int) -> int:
    return (prefix.bit_length() - 1) // DIGIT_BITS


def valid(prefix: int) -> bool:
    """Whether ``prefix`` is a well-formed prefix (what a peer sends is checked with this)."""
    return prefix >= ROOT and (prefix.bit_length() - 1) % DIGIT_BITS == 0 \
        and depth(prefix) <= MAX_DEPTH


def prefix_of(node: bytes, at: int) -> int:
    """The prefix of ``node`` (a node id's bytes) at depth ``at``."""
    key = int.from_bytes(node[:KEY_BITS // 8], "big")
    return (1 << DIGIT_BITS * at) | key >> (KEY_BITS - DIGIT_BITS * at)


def children(prefix: int) -> list[int]:
    return [prefix << DIGIT_BITS | i for i in range(FANOUT)]


def bounds(prefix: int) -> tuple[bytes, bytes | None]:
    """The node ids under ``prefix``: from the first (inclusive) to the second (exclusive;
    None: to the end)."""
    d = depth(prefix)
    digits = prefix ^ (1 << DIGIT_BITS * d)
    shift = 256 - DIGIT_BITS * d
    hi = (digits + 1) << shift
    return (digits << shift).to_bytes(32, "big"), None if hi >> 256 else hi.to_bytes(32, "big")


class TreeView(Protocol):
    """What the walk reads of one side's tree."""

    def count(self, prefix: int) -> int: ...

    def digest(self, prefix: int) -> int: ...


class PeerTree:
    """Entry counts and digests of every non-empty prefix, updated as entries come and go.

    :meth:`toggle` with ``sign=-1`` removes an entry added before; an overlay (base tree plus
    a tree of changes, as the simulator keeps) may hold negative counts.
    """

    __slots__ = ("_levels", "_root")

    def __init__(self) -> None:
        self._root = 0
        self._levels: list[dict[int, tuple[int, int]]] = [{} for _ in range(MAX_DEPTH + 1)]

    def toggle(self, node: bytes, created_at: int, sign: int = 1) -> None:
        h = entry_hash(node, created_at)
        self._root ^= h
        low = h >> (256 - 8 * DIGEST_BYTES)
        for at, level in enumerate(self._levels):
            p = prefix_of(node, at)
            n, d = level.get(p, (0, 0))
            if n + sign == 0 and d == low:
                del level[p]
            else:
                level[p] = (n + sign, d ^ low)

    def root(self) -> bytes:
        """The 32-byte digest of every entry (what ``g-hello`` carries)."""
        return self._root.to_bytes(32, "big")

    def count(self, prefix: int) -> int:
        return self._levels[depth(prefix)].get(prefix, (0, 0))[0]

    def digest(self, prefix: int) -> int:
        return self._levels[depth(prefix)].get(prefix, (0, 0))[1]


def child_digests(tree: TreeView, prefixes: list[int]) -> bytes:
    """The digests of the children of each of ``prefixes``, concatenated."""
    return b"".join(tree.digest(c).to_bytes(DIGEST_BYTES, "big")
                    for p in prefixes for c in children(p))


def leaf(tree: TreeView, prefix: int) -> bool:
    """Whether the initiator lists ``prefix``'s entries rather than splitting it further."""
    return depth(prefix) == MAX_DEPTH or tree.count(prefix) <= LEAF


def split(tree: TreeView, prefixes: list[int], theirs: bytes) -> tuple[list[int], list[int]]:
    """Compare our children of ``prefixes`` with the peer's digests of them: the differing
    children to split further and those to list.  ``ValueError`` if ``theirs`` is not one
    digest per child."""
    if len(theirs) != len(prefixes) * FANOUT * DIGEST_BYTES:
        raise ValueError(f"{len(theirs)} bytes of digests for {len(prefixes)} prefixes")
    deeper: list[int] = []
    listed: list[int] = []
    i = 0
    for p in prefixes:
        for c in children(p):
            if tree.digest(c) != int.from_bytes(theirs[i:i + DIGEST_BYTES], "big"):
                (listed if leaf(tree, c) else deeper).append(c)
            i += DIGEST_BYTES
    return deeper, listed


def masks(tree: TreeView, prefixes: list[int]) -> list[int]:
    """Per prefix, bit ``i`` set if we would split child ``i`` further should it differ."""
    return [sum(1 << i for i, c in enumerate(children(p)) if not leaf(tree, c))
            for p in prefixes]


def differ(tree: TreeView, prefixes: list[int], theirs: bytes,
           split_masks: list[int]) -> tuple[list[int], bytes]:
    """The responder's half of a ``g-tree`` step: the children of ``prefixes`` whose digests
    differ from the peer's (``theirs``), and our digests of the children of those the peer's
    masks mark.  ``ValueError`` if the request is malformed."""
    if len(split_masks) != len(prefixes) or len(theirs) != len(prefixes) * FANOUT * DIGEST_BYTES:
        raise ValueError("one mask and 16 digests per prefix expected")
    if not all(valid(p) and depth(p) < MAX_DEPTH for p in prefixes):
        raise ValueError("malformed prefix")
    out: list[int] = []
    deeper: list[int] = []
    i = 0
    for p, mask in zip(prefixes, split_masks, strict=True):
        for k, c in enumerate(children(p)):
            if tree.digest(c) != int.from_bytes(theirs[i:i + DIGEST_BYTES], "big"):
                out.append(c)
                if mask >> k & 1 and depth(c) < MAX_DEPTH:
                    deeper.append(c)
            i += DIGEST_BYTES
    return out, child_digests(tree, deeper)


def descend(tree: TreeView, prefixes: list[int], split_masks: list[int], differing: list[int],
            theirs: bytes) -> tuple[list[int], list[int]]:
    """The initiator's half: from the peer's answer to ``g-tree`` for ``prefixes`` (sent with
    ``split_masks``), the prefixes two levels down to split further and those to list.
    ``ValueError`` if the answer does not fit the question."""
    marked = {c: mask >> k & 1 for p, mask in zip(prefixes, split_masks, strict=True)
              for k, c in enumerate(children(p))}
    if any(c not in marked for c in differing):
        raise ValueError("answer names a prefix that was not asked about")
    deep = [c for c in differing if marked[c]]
    deeper, listed = split(tree, deep, theirs)
    return deeper, [c for c in differing if not marked[c]] + listed
