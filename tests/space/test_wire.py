from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import blake3
import msgspec
import pytest

from blobmesh.errors import ProtocolError
from blobmesh.space import Limits, Metrics, peertree, wire
from blobmesh.space.peertree import PeerTree


def test_oversized_message_rejected_before_decoding() -> None:
    lim, m = dataclasses.replace(Limits(), max_message_bytes=1000), Metrics()
    # valid msgpack that would decode fine: only the size check can stop it
    raw = wire.encode(wire.PushOps(1, [b"x" * 2000], True))
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.decode_request(raw, lim, m)
    assert m["limit_message_bytes"] == 1 and m["malformed_messages"] == 0


def test_element_counts_are_bounded() -> None:
    lim, m = dataclasses.replace(Limits(), max_elements=10), Metrics()
    raw = wire.encode(wire.Fetch(1, [b"i"] * 11))
    with pytest.raises(ProtocolError, match="11 ids"):
        wire.decode_request(raw, lim, m)
    assert m["limit_message_elements"] == 1
    assert wire.decode_request(wire.encode(wire.Fetch(1, [b"i"] * 10)), lim, m).rid == 1


def test_garbage_and_wrong_family_are_protocol_errors() -> None:
    lim, m = Limits(), Metrics()
    for raw in (b"\xc1", msgspec.msgpack.encode(["nope", 1]), wire.encode(wire.Ack(1))):
        with pytest.raises(ProtocolError):
            wire.decode_request(raw, lim, m)
    assert m["malformed_messages"] == 3


VECTORS = json.loads((Path(__file__).parents[2] / "docs" / "space-vectors.json").read_text())
NODES = [bytes([i * 17 % 256]) * 32 for i in range(1, 21)]
T0 = 1_764_650_000_000


def test_peer_tree_vectors() -> None:
    key = blake3.blake3(b"blobmesh/space/peer-entry/v1").digest()
    for e in VECTORS["entries"]:  # independently of peertree: keyed BLAKE3 of node ‖ created_at
        raw = bytes.fromhex(e["node"]) + e["created_at"].to_bytes(8, "big")
        assert blake3.blake3(raw, key=key).hexdigest() == e["hash"]
        assert peertree.entry_hash(bytes.fromhex(e["node"]), e["created_at"]) == int(e["hash"], 16)
    tree = PeerTree()
    for i, n in enumerate(NODES):
        tree.toggle(n, T0 + i)
    assert tree.root().hex() == VECTORS["root"]
    assert peertree.child_digests(tree, [peertree.ROOT]).hex() == VECTORS["root_children"]
    root = 0
    for i, n in enumerate(NODES):
        root ^= peertree.entry_hash(n, T0 + i)
    assert f"{root:064x}" == VECTORS["root"]


def test_gossip_message_vectors() -> None:
    tree = PeerTree()
    for i, n in enumerate(NODES):
        tree.toggle(n, T0 + i)
    session = bytes(range(16))
    msgs: dict[str, wire.Message] = {
        "g-hello": wire.GossipHello(7, session, tree.root(), bytes(32),
                                    peertree.child_digests(tree, [peertree.ROOT]), 0),
        "g-state": wire.GossipState(7, tree.root(), bytes(32), [0x11, 0x1F],
                                    peertree.child_digests(tree, [0x11])),
        "g-tree": wire.PeerTreeReq(8, session, [0x11], peertree.child_digests(tree, [0x11]),
                                   [0x0002]),
        "g-tree-diff": wire.PeerTreeDiff(8, [0x111], peertree.child_digests(tree, [0x111])),
        "g-peers": wire.PeerSummary(9, session, [0x1FF], [(NODES[14], T0 + 14)], True),
    }
    lim, m = Limits(), Metrics()
    for name, msg in msgs.items():
        raw = bytes.fromhex(VECTORS["messages"][name])
        assert wire.encode(msg) == raw, name
        decode = wire.decode_request if name in ("g-hello", "g-tree", "g-peers") \
            else wire.decode_response
        assert decode(raw, lim, m) == msg
