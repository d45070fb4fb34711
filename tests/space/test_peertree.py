"""The prefix tree of peer-record entries and the steps of the walk down two of them."""

from __future__ import annotations

import itertools
import random

import pytest

from blobmesh.space import peertree
from blobmesh.space.peertree import ROOT, PeerTree


def ids(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(n)]


def test_prefixes_encode_their_depth_and_tile_their_parent() -> None:
    node = bytes([0xAB, 0xCD, 0xEF]) + bytes(29)
    assert [peertree.prefix_of(node, d) for d in range(4)] == [ROOT, 0x1A, 0x1AB, 0x1ABC]
    assert [peertree.depth(p) for p in (ROOT, 0x1A, 0x1AB)] == [0, 1, 2]
    assert peertree.children(0x1A) == list(range(0x1A0, 0x1B0))
    assert all(peertree.valid(p) for p in (ROOT, 0x1F, 0x1FFFFFF))
    assert not any(peertree.valid(p) for p in (0, -1, 2, 0x1FF_FFFF_F, 1 << 28))
    assert peertree.bounds(ROOT) == (bytes(32), None)
    lo, hi = peertree.bounds(0x1AB)
    assert lo == bytes([0xAB]) + bytes(31) and hi == bytes([0xAC]) + bytes(31)
    assert peertree.bounds(0x1F)[1] is None
    # the children's ranges follow one another and cover the parent's
    spans = [peertree.bounds(c) for c in peertree.children(0x1A)]
    assert spans[0][0] == peertree.bounds(0x1A)[0] and spans[-1][1] == peertree.bounds(0x1A)[1]
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def test_digests_follow_the_entries_whatever_the_order() -> None:
    nodes = ids(300)
    a, b = PeerTree(), PeerTree()
    for n in nodes:
        a.toggle(n, 5)
    for n in reversed(nodes):
        b.toggle(n, 5)
    assert a.root() == b.root() and a.count(ROOT) == 300
    assert sum(a.count(c) for c in peertree.children(ROOT)) == 300
    b.toggle(nodes[7], 5, -1)  # a record replaced by a newer one
    b.toggle(nodes[7], 6)
    assert a.root() != b.root() and b.count(ROOT) == 300
    path = {peertree.prefix_of(nodes[7], d) for d in range(peertree.MAX_DEPTH + 1)}
    for d in range(1, 4):
        level = [p for n in nodes if (p := peertree.prefix_of(n, d))]
        assert {p for p in level if a.digest(p) != b.digest(p)} == path & set(level)
    for n in nodes:
        a.toggle(n, 5, -1)
    assert a.root() == bytes(32) and a.count(ROOT) == 0 and a.digest(ROOT) == 0


def walk(mine: PeerTree, theirs: PeerTree) -> tuple[list[int], int]:
    """The prefixes the initiator ends up listing, and how many g-tree steps it took."""
    splitting, listed, steps = [ROOT], [], 0
    while splitting:
        steps += 1
        masks = peertree.masks(mine, splitting)
        differing, below = peertree.differ(theirs, splitting, peertree.child_digests(
            mine, splitting), masks)
        splitting, more = peertree.descend(mine, splitting, masks, differing, below)
        listed += more
    return listed, steps


def test_the_walk_finds_the_few_differing_prefixes_two_levels_a_step() -> None:
    nodes = ids(10_000)
    a, b = PeerTree(), PeerTree()
    for n in nodes:
        a.toggle(n, 1)
        b.toggle(n, 1)
    changed = [nodes[3], nodes[4000]]
    for n in changed:
        b.toggle(n, 1, -1)
        b.toggle(n, 2)
    listed, steps = walk(a, b)
    assert len(listed) == 2 and steps == 2  # 10,000 records: 16 × 16 × 16 leaves of ~2.4
    for n in changed:
        assert any(peertree.prefix_of(n, peertree.depth(p)) == p for p in listed)
    assert all(a.count(p) <= peertree.LEAF for p in listed)
    assert walk(a, a) == ([], 1)


def test_malformed_steps_are_value_errors() -> None:
    tree = PeerTree()
    tree.toggle(ids(1)[0], 1)
    digests = peertree.child_digests(tree, [ROOT])
    with pytest.raises(ValueError, match="mask"):
        peertree.differ(tree, [ROOT], digests[:-1], [0])
    with pytest.raises(ValueError, match="prefix"):
        peertree.differ(tree, [2], digests, [0])
    with pytest.raises(ValueError, match="prefix"):  # a leaf has no children to compare
        peertree.differ(tree, [1 << 4 * peertree.MAX_DEPTH], digests, [0])
    with pytest.raises(ValueError, match="not asked"):
        peertree.descend(tree, [ROOT], [0], [0x100], b"")
    with pytest.raises(ValueError, match="digests"):
        peertree.descend(tree, [ROOT], [0xFFFF], [0x10], b"")
