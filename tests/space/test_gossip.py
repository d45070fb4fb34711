"""Anti-entropy state machines driven directly: no sockets, explicit time."""

from __future__ import annotations

import dataclasses
import time

from blobmesh.space import Limits, Metrics, wire
from blobmesh.space.gossip import (
    ApplyRecords,
    GossipInitiator,
    GossipResponder,
    OfferOps,
    SendRecords,
    WantOps,
)
from blobmesh.space.records import decode_op, decode_record, sign_op, sign_record
from blobmesh.space.store import OpStore, PeerStore, open_db
from blobmesh.transport.identity import Identity, NodeId

NOW = int(time.time() * 1000)


class Side:
    def __init__(self, limits: Limits) -> None:
        self.id = Identity.generate()
        self.limits = limits
        self.metrics = Metrics()
        db = open_db(":memory:")
        self.peers = PeerStore(db, "s", limits, self.metrics, NOW)
        self.ops = OpStore(db, "s", 60_000, limits, self.metrics)
        self.responder = GossipResponder(self.peers, self.ops, limits, self.metrics)

    def add_record(self, ident: Identity, created: int = NOW) -> None:
        raw = sign_record(ident, space="s", addresses=[], groups=[], capabilities={},
                          created_at=created, expires_at=created + 3_600_000)
        self.peers.put(decode_record(raw, space="s", now_ms=NOW, limits=self.limits))

    def add_ops(self, n: int, start: int = 0) -> None:
        ops = [sign_op(self.id, space="s", kind="k", timestamp=NOW - 600_000 + i * 10,
                       payload=str(i).encode(), limits=self.limits)
               for i in range(start, start + n)]
        self.ops.mark_gossipable(o.id for o in self.ops.insert(ops))

    def copy_ops_to(self, other: Side, ids: list[bytes]) -> None:
        raws = self.ops.get_raw(ids).values()
        ops = [decode_op(r, space="s", now_ms=NOW, limits=self.limits) for r in raws]
        other.ops.mark_gossipable(o.id for o in other.ops.insert(ops))


def round_trip(a: Side, b: Side, now: float = 0.0) -> tuple[int, int]:
    """One gossip round a -> b, applying effects at once; returns (requests, bytes)."""
    init = GossipInitiator(a.peers, a.ops, b"sess-" + a.id.node_id.digest[:11], a.limits)
    req: wire.Request | None = init.start()
    n = size = 0
    while req is not None:
        n += 1
        assert isinstance(req, wire.GossipHello | wire.PeerTreeReq | wire.PeerSummary
                          | wire.OpSummary | wire.OpIdsReq)
        resp = b.responder.handle(a.id.node_id, req, now)
        size += len(wire.encode(req)) + len(wire.encode(resp))
        req, effects = init.on_response(resp)
        for eff in effects:
            match eff:
                case ApplyRecords():
                    for raw in eff.records:
                        a.peers.put(decode_record(raw, space="s", now_ms=NOW, limits=a.limits))
                case SendRecords():
                    for node in eff.nodes:
                        rec = a.peers.get(NodeId(node))
                        assert rec is not None
                        b.peers.put(rec)
                case WantOps():
                    b.copy_ops_to(a, eff.ids)
                case OfferOps():
                    a.copy_ops_to(b, eff.ids)
    return n, size


def synced(a: Side, b: Side) -> bool:
    return a.peers.digest() == b.peers.digest() and a.ops.digest() == b.ops.digest()


def test_reconciles_records_and_ops_both_ways() -> None:
    lim = Limits()
    a, b = Side(lim), Side(lim)
    shared, newer = Identity.generate(), Identity.generate()
    a.add_record(shared)
    b.add_record(shared)
    a.add_record(newer, NOW)
    b.add_record(newer, NOW + 5)  # b holds the newer record of this node
    a.add_record(Identity.generate())
    b.add_record(Identity.generate())
    a.add_ops(30)
    b.add_ops(20, start=25)  # ops are authored by each side, so all 50 differ
    round_trip(a, b)
    assert synced(a, b)
    assert len(a.ops) == len(b.ops) == 50
    rec = a.peers.get(newer.node_id)
    assert rec is not None and rec.created_at == NOW + 5


def test_steady_state_cost_is_flat_in_ops_held() -> None:
    lim = Limits()
    costs = []
    for n in (10, 2000):
        a, b = Side(lim), Side(lim)
        a.add_ops(n)
        round_trip(a, b)
        assert synced(a, b)
        costs.append(round_trip(a, b))
    assert costs[0] == costs[1]
    assert costs[0][0] == 1 and costs[0][1] < 200


def test_large_differences_page_through_bounded_messages() -> None:
    lim = dataclasses.replace(Limits(), max_elements=100)
    a, b = Side(lim), Side(lim)
    b.add_ops(450)
    requests, _ = round_trip(a, b)
    assert synced(a, b) and requests >= 5


def test_session_is_bound_to_the_peer_that_opened_it() -> None:
    lim = Limits()
    a, b = Side(lim), Side(lim)
    a.add_ops(3)
    session = b"s" * 16
    hello = wire.GossipHello(1, session, a.peers.digest(), a.ops.digest(), b"", 0)
    assert isinstance(b.responder.handle(a.id.node_id, hello, 0.0), wire.GossipState)
    intruder = Identity.generate().node_id
    resp = b.responder.handle(intruder, wire.OpIdsReq(2, session, b""), 0.0)
    assert isinstance(resp, wire.Error) and b.metrics["gossip_bad_session"] == 1
    resp = b.responder.handle(a.id.node_id, wire.OpIdsReq(3, b"x" * 16, b""), 0.0)
    assert isinstance(resp, wire.Error)
    resp = b.responder.handle(a.id.node_id, wire.OpSummary(4, session, []), 1000.0)
    assert isinstance(resp, wire.Error)  # expired


def test_concurrent_sessions_are_bounded() -> None:
    lim = dataclasses.replace(Limits(), max_gossip_sessions=2)
    b = Side(lim)
    b.add_ops(1)
    busy = 0
    for _ in range(3):
        hello = wire.GossipHello(1, b"s" * 16, b"\0" * 32, b"\0" * 32, b"", 0)
        resp = b.responder.handle(Identity.generate().node_id, hello, 0.0)
        busy += isinstance(resp, wire.Busy)
    assert busy == 1 and b.metrics["limit_gossip_sessions"] == 1


def test_a_changed_record_costs_its_prefix_path_not_every_record_held() -> None:
    lim = Limits()
    a, b = Side(lim), Side(lim)
    people = [Identity.generate() for _ in range(600)]
    for p in people:
        a.add_record(p)
        b.add_record(p)
    assert synced(a, b) and round_trip(a, b)[0] == 1
    b.add_record(people[17], NOW + 1)  # re-signed
    a.add_record(people[400], NOW + 1)
    requests, size = round_trip(a, b)
    assert synced(a, b)
    rec = a.peers.get(people[17].node_id)
    assert rec is not None and rec.created_at == NOW + 1
    # hello/state (with two levels of digests), at most one g-tree step, one listing;
    # listing all 600 entries alone would take 26 KB
    assert requests <= 3 and size < 2500


def test_a_node_knowing_nobody_gets_every_record_in_one_round() -> None:
    lim = Limits()
    a, b = Side(lim), Side(lim)
    a.add_record(a.id)
    for _ in range(300):
        b.add_record(Identity.generate())
    requests, _ = round_trip(a, b)
    assert synced(a, b) and len(a.peers) == 301 and requests == 2


def test_malformed_tree_steps_are_refused_and_end_the_round() -> None:
    lim = Limits()
    a, b = Side(lim), Side(lim)
    for _ in range(20):
        b.add_record(Identity.generate())
    session = b"s" * 16
    hello = wire.GossipHello(1, session, a.peers.digest(), a.ops.digest(), b"x" * 5, 0)
    assert isinstance(b.responder.handle(a.id.node_id, hello, 0.0), wire.Error)
    ok = wire.GossipHello(1, session, a.peers.digest(), a.ops.digest(), b"", 0)
    assert isinstance(b.responder.handle(a.id.node_id, ok, 0.0), wire.GossipState)
    bad = wire.PeerTreeReq(2, session, [3], bytes(128), [0])
    resp = b.responder.handle(a.id.node_id, bad, 0.0)
    assert isinstance(resp, wire.Error) and "prefix" in resp.reason
    listing = wire.PeerSummary(3, session, [0], [], True)
    assert isinstance(b.responder.handle(a.id.node_id, listing, 0.0), wire.Error)
    # an initiator given an answer to a question it did not ask stops
    for _ in range(20):
        a.add_record(Identity.generate())
    init = GossipInitiator(a.peers, a.ops, session, lim)
    init.start()
    state = wire.GossipState(1, b.peers.digest(), b.ops.digest(), [0x1234], b"")
    assert init.on_response(state) == (None, [])
