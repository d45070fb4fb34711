"""Anti-entropy gossip as sans-I/O state machines (initiator and responder).

A round costs one request/response when both sides agree (two 32-byte digests: peers and
ops), so steady-state traffic does not depend on how many ops are held.  Otherwise:

* peers: the initiator sends ``(node id, created_at)`` of every record (in pages); the
  responder answers with its newer or unknown records and the ids it wants;
* ops: the initiator sends ``(bucket, count, digest)`` per time bucket; the responder names the
  buckets that differ and then lists its ids in them (paged); the initiator wants (fetches)
  what it lacks and offers (pushes) what the responder lacked.

Responder sessions are keyed by the authenticated peer: a session id is only valid on the
link of the peer that opened it, at most one per peer, at most ``max_gossip_sessions`` in all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blobmesh.space import wire
from blobmesh.space.config import Limits
from blobmesh.space.metrics import Metrics
from blobmesh.space.store import OpStore, PeerStore
from blobmesh.transport.identity import NodeId

SESSION_TTL = 30.0


@dataclass(frozen=True, slots=True)
class ApplyRecords:
    """Verify and store these signed records received from the peer."""

    records: list[bytes]


@dataclass(frozen=True, slots=True)
class SendRecords:
    """Push our records of these nodes to the peer (it holds older ones or none)."""

    nodes: list[bytes]


@dataclass(frozen=True, slots=True)
class WantOps:
    """Fetch these op ids from the peer."""

    ids: list[bytes]


@dataclass(frozen=True, slots=True)
class OfferOps:
    """Push these ops of ours to the peer, which lacks them."""

    ids: list[bytes]


Effect = ApplyRecords | SendRecords | WantOps | OfferOps


def _record_budget(limits: Limits) -> int:
    return limits.max_message_bytes - 1024  # headroom for the envelope


class GossipInitiator:
    """One round with one peer, from the side that started it."""

    def __init__(self, peers: PeerStore, ops: OpStore, session: bytes, limits: Limits) -> None:
        self._peers = peers
        self._ops = ops
        self._session = session
        self._limits = limits
        self._ops_differ = False
        self._peer_pages: list[list[tuple[bytes, int]]] = []
        self._diff_buckets: list[int] = []
        self._remote_ids: set[bytes] = set()
        self._id_pages = 0
        self._sent = (b"", b"")

    def start(self) -> wire.Request:
        # both sides decide "differ" from the same pair: what we sent and what they answer
        self._sent = (self._peers.digest(), self._ops.digest())
        return wire.GossipHello(0, self._session, *self._sent)

    def on_response(self, msg: wire.Response) -> tuple[wire.Request | None, list[Effect]]:
        """Feed the peer's answer; returns the next request (None: round over) and effects."""
        match msg:
            case wire.GossipState():
                self._ops_differ = msg.ops_digest != self._sent[1]
                if msg.peers_digest != self._sent[0]:
                    summary = self._peers.summary()
                    n = self._limits.max_elements
                    self._peer_pages = [summary[i:i + n] for i in range(0, len(summary), n)]
                    return self._next_peer_page(), []
                return self._after_peers(), []
            case wire.PeerDiff():
                effects: list[Effect] = []
                if msg.records:
                    effects.append(ApplyRecords(msg.records))
                if msg.want:
                    effects.append(SendRecords(msg.want))
                nxt = self._next_peer_page() if self._peer_pages else self._after_peers()
                return nxt, effects
            case wire.OpDiff():
                self._diff_buckets = msg.buckets
                if not msg.buckets:
                    return None, []
                return wire.OpIdsReq(0, self._session, b""), []
            case wire.OpIds():
                return self._on_ids(msg)
            case _:
                return None, []

    def _next_peer_page(self) -> wire.Request:
        page = self._peer_pages.pop(0) if self._peer_pages else []
        return wire.PeerSummary(0, self._session, page, not self._peer_pages)

    def _after_peers(self) -> wire.Request | None:
        if not self._ops_differ:
            return None
        buckets = [(b, n, d) for b, (n, d) in sorted(self._ops.buckets().items())]
        return wire.OpSummary(0, self._session, buckets[-self._limits.max_elements:])

    def _on_ids(self, msg: wire.OpIds) -> tuple[wire.Request | None, list[Effect]]:
        self._id_pages += 1
        ids = [i for _, i in msg.ids]
        self._remote_ids.update(ids)
        effects: list[Effect] = []
        missing = self._ops.missing(ids)
        if missing:
            effects.append(WantOps(missing))
        if not msg.done and msg.ids and self._id_pages < self._limits.gossip_id_pages:
            return wire.OpIdsReq(0, self._session, msg.ids[-1][1]), effects
        if msg.done:
            # only a complete listing tells us what the peer lacks
            ours = self._ops.ids_in(self._diff_buckets, b"",
                                    self._limits.gossip_id_pages * self._limits.max_elements)
            offer = [i for _, i in ours if i not in self._remote_ids]
            if offer:
                effects.append(OfferOps(offer))
        return None, effects


@dataclass(slots=True)
class _Session:
    id: bytes
    started: float
    ops_differ: bool
    seen: set[bytes] = field(default_factory=set)
    buckets: list[int] = field(default_factory=list)


class GossipResponder:
    """Answers gossip requests; one session per authenticated peer."""

    def __init__(self, peers: PeerStore, ops: OpStore, limits: Limits, metrics: Metrics) -> None:
        self._peers = peers
        self._ops = ops
        self._limits = limits
        self._metrics = metrics
        self._sessions: dict[NodeId, _Session] = {}

    def drop(self, peer: NodeId) -> None:
        """Forget ``peer``'s session (its link closed)."""
        self._sessions.pop(peer, None)

    def handle(self, peer: NodeId, msg: wire.GossipHello | wire.PeerSummary | wire.OpSummary
               | wire.OpIdsReq, now: float) -> wire.Response:
        if isinstance(msg, wire.GossipHello):
            return self._hello(peer, msg, now)
        s = self._sessions.get(peer)
        if s is None or s.id != msg.session or now - s.started > SESSION_TTL:
            self._metrics.inc("gossip_bad_session")
            return wire.Error(msg.rid, "no such gossip session for this peer")
        match msg:
            case wire.PeerSummary():
                if msg.complete and not s.ops_differ:
                    del self._sessions[peer]
                return self._peer_summary(s, msg)
            case wire.OpSummary():
                return self._op_summary(s, msg)
            case wire.OpIdsReq():
                limit = self._limits.max_elements
                ids = self._ops.ids_in(s.buckets, msg.after, limit)
                done = len(ids) < limit
                if done:
                    del self._sessions[peer]
                return wire.OpIds(msg.rid, ids, done)
        raise AssertionError(msg)  # pragma: no cover - the union is exhaustive

    def _hello(self, peer: NodeId, msg: wire.GossipHello, now: float) -> wire.Response:
        if peer not in self._sessions and len(self._sessions) >= self._limits.max_gossip_sessions:
            for p in [p for p, s in self._sessions.items() if now - s.started > SESSION_TTL]:
                del self._sessions[p]
            if len(self._sessions) >= self._limits.max_gossip_sessions:
                self._metrics.limit("gossip_sessions")
                return wire.Busy(msg.rid, 1000)
        ops_differ = msg.ops_digest != self._ops.digest()
        if ops_differ or msg.peers_digest != self._peers.digest():
            self._sessions[peer] = _Session(msg.session, now, ops_differ)
        else:
            self._sessions.pop(peer, None)
        return wire.GossipState(msg.rid, self._peers.digest(), self._ops.digest())

    def _peer_summary(self, s: _Session, msg: wire.PeerSummary) -> wire.Response:
        records: list[bytes] = []
        want: list[bytes] = []
        budget = _record_budget(self._limits)
        for node, created in msg.entries:
            s.seen.add(node)
            try:
                mine = self._peers.get(NodeId(node))
            except ValueError:
                return wire.Error(msg.rid, "malformed node id in peer summary")
            if mine is None or mine.created_at < created:
                want.append(node)
            elif mine.created_at > created and budget >= len(mine.raw):
                records.append(mine.raw)
                budget -= len(mine.raw)
        if len(s.seen) > self._limits.max_peers:
            self._metrics.limit("gossip_peer_summary")
            return wire.Error(msg.rid, "peer summary larger than max_peers")
        if msg.complete:
            for rec in self._peers:
                if (rec.node_id.digest not in s.seen and budget >= len(rec.raw)
                        and len(records) < self._limits.max_elements):
                    records.append(rec.raw)
                    budget -= len(rec.raw)
        return wire.PeerDiff(msg.rid, records[:self._limits.max_elements], want)

    def _op_summary(self, s: _Session, msg: wire.OpSummary) -> wire.Response:
        mine = self._ops.buckets()
        theirs = {b: (n, d) for b, n, d in msg.buckets}
        lowest = min(theirs) if len(theirs) >= self._limits.max_elements else None
        differ = {b for b in theirs if mine.get(b) != theirs[b]}
        differ.update(b for b in mine if b not in theirs and (lowest is None or b >= lowest))
        s.buckets = sorted(differ)[-self._limits.max_elements:]
        return wire.OpDiff(msg.rid, s.buckets)
