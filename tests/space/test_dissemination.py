"""The dissemination core under a fake clock: gossip schedule, push targets, fetch timers."""

from __future__ import annotations

import dataclasses
import itertools
import random

from blobmesh.space import Limits, Metrics, Timing
from blobmesh.space.dissemination import Dissemination, FetchFrom, GossipWith, Push
from blobmesh.transport.identity import Identity, NodeId

T = Timing(gossip_interval=1.0, gossip_fanout=1, publish_fanout=3, relay_fanout=1,
           fetch_retry_base=0.5, fetch_retry_max=4.0, rejected_op_ttl=10.0)


class View:
    def __init__(self, peers: list[NodeId], seeds: list[NodeId] | None = None) -> None:
        self.peers = peers
        self.seeds = seeds or []
        self.left = False

    def alive_peers(self) -> list[NodeId]:
        return sorted(self.peers)  # the contract: by node id

    def seed_ids(self) -> list[NodeId]:
        return list(self.seeds)

    def known_records(self) -> int:
        return len(self.peers) + 1

    def active(self) -> bool:
        return not self.left


def nodes(n: int) -> list[NodeId]:
    return [Identity.generate().node_id for _ in range(n)]


def core(view: View, **limits: int) -> tuple[Dissemination, Metrics]:
    m = Metrics()
    d = Dissemination(T, dataclasses.replace(Limits(), **limits), view, rng=random.Random(5),
                      metrics=m)
    d.start(0.0)
    return d, m


def rounds(d: Dissemination, until: float) -> list[float]:
    """Times of the gossip rounds when woken only at get_timer(); each ends at once."""
    out: list[float] = []
    now = 0.0
    while (now := max(now, d.get_timer())) <= until:
        for a in d.handle_timer(now):
            if isinstance(a, GossipWith):
                out.append(now)
    return out


def test_rounds_are_jittered_intervals_and_faster_while_they_bring_news() -> None:
    d, _ = core(View(nodes(4)))
    idle = rounds(d, 30.0)
    gaps = [b - a for a, b in itertools.pairwise(idle)]
    assert 25 <= len(idle) <= 40 and all(0.75 <= g <= 1.25 for g in gaps)
    busy, _ = core(View(nodes(4)))
    now, got = 0.0, []
    while (now := max(now, busy.get_timer())) <= 10.0:
        for a in busy.handle_timer(now):
            if isinstance(a, GossipWith):
                got.append(now)
                busy.news()  # every round brings something new
    assert len(got) >= 30  # a quarter of the interval


def test_a_running_round_is_not_doubled_and_seeds_stand_in_for_peers() -> None:
    seed = nodes(1)
    view = View([], seed)
    d, _ = core(view)
    (first,) = d.handle_timer(d.get_timer())
    assert first == GossipWith(seed[0]) and d.begin_round(seed[0])
    assert d.handle_timer(d.get_timer()) == []  # still gossiping with it
    assert not d.begin_round(seed[0])
    d.round_over(seed[0])
    assert d.handle_timer(d.get_timer()) == [GossipWith(seed[0])]
    view.left = True
    assert d.handle_timer(d.get_timer()) == []


def test_announce_pushes_to_the_fanout_with_the_preferred_as_relayers() -> None:
    peers = nodes(6)
    d, m = core(View(peers))
    pushes = d.announce("ops", [b"op"], exclude=peers[0], in_flight=0, prefer=[peers[5]])
    assert len(pushes) == T.publish_fanout and peers[0] not in {p.peer for p in pushes}
    assert pushes[0] == Push("ops", peers[5], [b"op"], True)
    assert [p.relay for p in pushes] == [True, False, False]
    full, m = core(View(peers), max_pushes=4)
    assert full.announce("ops", [b"op"], None, in_flight=2) == []
    assert m["limit_pushes"] == 1


def test_fetch_retries_wake_the_timer_at_their_backoff() -> None:
    a, b = nodes(2)
    d, _ = core(View([a, b]))
    d.want(a, [b"x" * 32], now=0.0)
    assert d.get_timer() == 0.0
    (req,) = [x for x in d.handle_timer(0.0) if isinstance(x, FetchFrom)]
    assert req == FetchFrom(a, [b"x" * 32])
    assert d.fetch.next_due() is None  # in flight: only the reply (an event) moves it
    d.fetch.failed(a, req.ids, now=0.0)
    assert d.fetch.next_due() == T.fetch_retry_base
    fetches = []
    now = 0.0
    while (now := max(now, d.get_timer())) <= T.fetch_retry_base:
        fetches += [(now, x) for x in d.handle_timer(now) if isinstance(x, FetchFrom)]
    assert fetches == [(T.fetch_retry_base, req)]


def test_refused_ops_are_not_fetched_until_their_ttl_or_their_author_joins() -> None:
    src, author = nodes(2)
    d, _ = core(View([src]))
    d.refused(b"r" * 32, author, now=0.0)
    d.refused(b"s" * 32, None, now=0.0)
    d.want(src, [b"r" * 32, b"s" * 32], now=1.0)
    assert len(d.fetch) == 0
    d.member_joined(author)
    d.want(src, [b"r" * 32, b"s" * 32], now=2.0)
    assert len(d.fetch) == 1 and b"r" * 32 in d.fetch
    d.want(src, [b"s" * 32], now=T.rejected_op_ttl)
    assert b"s" * 32 in d.fetch
