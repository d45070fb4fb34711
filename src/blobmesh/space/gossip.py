"""Anti-entropy gossip as sans-I/O state machines (initiator and responder).

A round costs one request/response when both sides agree (two 32-byte digests: peers and
ops), so steady-state traffic does not depend on how many ops are held.  Otherwise:

* peers: the initiator walks down the prefix tree of node ids (:mod:`.peertree`), asking for
  the children's digests of each prefix whose digests differ (``g-tree``), and lists
  ``(node id, created_at)`` of its records only in the differing prefixes small enough to list
  (``g-peers``, paged); the responder answers each listing with its newer records and the
  records it holds under those prefixes that were not listed, and the ids it wants;
* ops: the initiator sends ``(bucket, count, digest)`` per time bucket; the responder names the
  buckets that differ and then lists its ids in them (paged); the initiator wants (fetches)
  what it lacks and offers (pushes) what the responder lacked.

Responder sessions are keyed by the authenticated peer: a session id is only valid on the
link of the peer that opened it, at most one per peer, at most ``max_gossip_sessions`` in all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blobmesh.space import peertree, wire
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
        self._splitting: list[int] = []  # differing prefixes to split further
        self._asked: list[int] = []      # those we sent our children's digests of
        self._masks: list[int] = []      # and which of their children we would split
        self._listed: list[int] = []     # differing prefixes to list
        self._diff_buckets: list[int] = []
        self._remote_ids: set[bytes] = set()
        self._id_pages = 0
        self._sent = (b"", b"")

    def start(self) -> wire.Request:
        # both sides decide "differ" from the same pair: what we sent and what they answer
        self._sent = (self._peers.digest(), self._ops.digest())
        tree = self._peers.tree
        if not peertree.leaf(tree, peertree.ROOT):  # the hello is the walk's first step
            self._asked = [peertree.ROOT]
            self._masks = peertree.masks(tree, self._asked)
        return wire.GossipHello(0, self._session, *self._sent,
                                peertree.child_digests(tree, self._asked),
                                self._masks[0] if self._masks else 0)

    def on_response(self, msg: wire.Response) -> tuple[wire.Request | None, list[Effect]]:
        """Feed the peer's answer; returns the next request (None: round over) and effects."""
        match msg:
            case wire.GossipState():
                self._ops_differ = msg.ops_digest != self._sent[1]
                if msg.peers_digest != self._sent[0]:
                    if not self._asked:
                        self._listed.append(peertree.ROOT)
                        return self._walk(), []
                    return self._descend(msg.prefixes, msg.digests), []
                return self._after_peers(), []
            case wire.PeerTreeDiff():
                return self._descend(msg.prefixes, msg.digests), []
            case wire.PeerDiff():
                effects: list[Effect] = []
                if msg.records:
                    effects.append(ApplyRecords(msg.records))
                if msg.want:
                    effects.append(SendRecords(msg.want))
                return (self._listing() if self._listed else self._after_peers()), effects
            case wire.OpDiff():
                self._diff_buckets = msg.buckets
                if not msg.buckets:
                    return None, []
                return wire.OpIdsReq(0, self._session, b""), []
            case wire.OpIds():
                return self._on_ids(msg)
            case _:
                return None, []

    def _descend(self, differing: list[int], digests: bytes) -> wire.Request | None:
        try:
            deeper, listed = peertree.descend(self._peers.tree, self._asked, self._masks,
                                              differing, digests)
        except ValueError:
            return None  # not an answer to what we asked: the round is over
        self._splitting += deeper
        self._listed += listed
        return self._walk()

    def _walk(self) -> wire.Request:
        """Split the next differing prefixes, two levels a step; then list the small ones."""
        if not self._splitting:
            return self._listing()
        # an answer carries up to 16 prefixes and 16 × 16 digests per prefix asked
        n = max(1, self._limits.max_elements // peertree.FANOUT)
        self._asked, self._splitting = self._splitting[:n], self._splitting[n:]
        tree = self._peers.tree
        self._masks = peertree.masks(tree, self._asked)
        return wire.PeerTreeReq(0, self._session, self._asked,
                                peertree.child_digests(tree, self._asked), self._masks)

    def _listing(self) -> wire.Request:
        """The next page of listed prefixes (the last one, maybe empty, is ``complete``)."""
        n = self._limits.max_elements
        prefixes: list[int] = []
        entries: list[tuple[bytes, int]] = []
        while self._listed:
            under = self._peers.under(self._listed[0])
            if prefixes and len(entries) + len(under) > n:
                break
            prefixes.append(self._listed.pop(0))
            # only a prefix ground full of chosen node ids holds more than a page
            entries += [(r.node_id.digest, r.created_at) for r in under[:n]]
        return wire.PeerSummary(0, self._session, prefixes, entries, not self._listed)

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

    def handle(self, peer: NodeId, msg: wire.GossipHello | wire.PeerTreeReq | wire.PeerSummary
               | wire.OpSummary | wire.OpIdsReq, now: float) -> wire.Response:
        if isinstance(msg, wire.GossipHello):
            return self._hello(peer, msg, now)
        s = self._sessions.get(peer)
        if s is None or s.id != msg.session or now - s.started > SESSION_TTL:
            self._metrics.inc("gossip_bad_session")
            return wire.Error(msg.rid, "no such gossip session for this peer")
        match msg:
            case wire.PeerTreeReq():
                try:
                    differing, digests = peertree.differ(self._peers.tree, msg.prefixes,
                                                         msg.digests, msg.masks)
                except ValueError as exc:
                    return wire.Error(msg.rid, f"malformed g-tree: {exc}")
                return wire.PeerTreeDiff(msg.rid, differing, digests)
            case wire.PeerSummary():
                if msg.complete and not s.ops_differ:
                    del self._sessions[peer]
                return self._peer_summary(msg)
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
        peers_differ = msg.peers_digest != self._peers.digest()
        differing: list[int] = []
        digests = b""
        if peers_differ and msg.children:
            try:
                differing, digests = peertree.differ(self._peers.tree, [peertree.ROOT],
                                                     msg.children, [msg.mask])
            except ValueError as exc:
                return wire.Error(msg.rid, f"malformed g-hello: {exc}")
        if ops_differ or peers_differ:
            self._sessions[peer] = _Session(msg.session, now, ops_differ)
        else:
            self._sessions.pop(peer, None)
        return wire.GossipState(msg.rid, self._peers.digest(), self._ops.digest(), differing,
                                digests)

    def _peer_summary(self, msg: wire.PeerSummary) -> wire.Response:
        """Our newer records of the listed nodes, the ids of those we hold older or not at
        all, and our records under the listed prefixes that were not listed."""
        if not all(peertree.valid(p) for p in msg.prefixes):
            return wire.Error(msg.rid, "malformed prefix in g-peers")
        records: list[bytes] = []
        want: list[bytes] = []
        budget = _record_budget(self._limits)
        seen: set[bytes] = set()
        for node, created in msg.entries:
            seen.add(node)
            try:
                mine = self._peers.get(NodeId(node))
            except ValueError:
                return wire.Error(msg.rid, "malformed node id in peer summary")
            if mine is None or mine.created_at < created:
                want.append(node)
            elif mine.created_at > created and budget >= len(mine.raw):
                records.append(mine.raw)
                budget -= len(mine.raw)
        for p in msg.prefixes:
            for rec in self._peers.under(p):
                if len(records) >= self._limits.max_elements:
                    break
                if rec.node_id.digest not in seen and budget >= len(rec.raw):
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
