"""The swarm's sans-I/O schedulers, driven with a fake clock (no sockets, no sleeps)."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Sequence

import pytest

from blobmesh.distribution.peerwire import REJECT_BUSY, REJECT_ELSEWHERE
from blobmesh.distribution.scheduler import (
    CLAIM_PENDING,
    Announce,
    Ban,
    Cancel,
    Close,
    Complete,
    Dial,
    DownloadPolicy,
    DownloadScheduler,
    Failed,
    Flush,
    Refuse,
    Request,
    RequestLayer,
    Serve,
    StateChanged,
    UploadScheduler,
)
from blobmesh.types import Bitfield


def bf(size: int, indices: list[int] | None = None) -> Bitfield:
    b = Bitfield(size)
    b.update(range(size) if indices is None else indices)
    return b


def job(pieces: int = 8, peers: list[int] | None = None, **policy: object
        ) -> DownloadScheduler[str, int]:
    names = [1, 2, 3] if peers is None else peers
    return DownloadScheduler[str, int](pieces, 0, lambda: names, 0.0,
                                       DownloadPolicy(**policy),  # type: ignore[arg-type]
                                       rng=random.Random(1))


def requests(actions: Sequence[object], conn: str | None = None) -> list[int]:
    return [a.index for a in actions if isinstance(a, Request) and conn in (None, a.conn)]


def test_dials_up_to_max_peers_and_retries_only_after_peer_retry() -> None:
    j = job(peers=[9, 0, 1, 2], max_peers=2, peer_retry=1.0)  # 9: the source; we are 0
    first = j.handle_timer(0.0)
    assert first[0] == Dial(9) and len(first) == 2  # a small scope: all dial the source first
    assert Dial(0) not in first
    dialed = {a.peer for a in first if isinstance(a, Dial)}
    (last,) = {1, 2} - dialed
    assert j.dial_ended(9, 0.1) == [Dial(last)]  # failed: the next candidate
    other = (dialed - {9}).pop()
    assert j.dial_ended(other, 0.2) == []  # the others wait for peer_retry, one is dialing
    assert j.get_timer() == 1.0
    assert j.handle_timer(1.0) != []


def test_only_about_source_fanout_targets_dial_the_source_first_and_orders_differ() -> None:
    peers = [10_000, *range(1, 1001)]
    firsts = []
    for seed in range(1000):
        j = DownloadScheduler[str, int](8, 0, lambda: peers, 0.0, DownloadPolicy(max_peers=1),
                                        rng=random.Random(seed))
        firsts.append(j.handle_timer(0.0)[0])
    assert 15 <= sum(a == Dial(10_000) for a in firsts) <= 50  # source_fanout = 32
    assert len(set(firsts)) > 500  # not everybody dials the same peer


def test_a_target_not_dialing_the_source_first_dials_it_only_after_peer_retry_alone() -> None:
    peers = [10_000, *range(1, 1001)]  # the source, then 1,000 targets
    def target(seed: int) -> DownloadScheduler[str, int]:
        return DownloadScheduler[str, int](8, 0, lambda: peers, 0.0,
                                           DownloadPolicy(max_peers=8, stall_timeout=100.0),
                                           rng=random.Random(seed))

    # (a job whose draw does not put the source first: most of them, in a large scope)
    seed = next(s for s in range(100) if Dial(10_000) not in target(s).handle_timer(0.0))
    j = target(seed)
    dialed = [a.peer for a in j.handle_timer(0.0) if isinstance(a, Dial)]
    now = 0.0
    while dialed:  # every dial fails at once (peers not yet in the distribution, or full)
        now += 0.002
        peer = dialed.pop()
        dialed += [a.peer for a in j.dial_ended(peer, now) if isinstance(a, Dial)]
        assert 10_000 not in dialed  # the whole sample refused: still not the source ...
    assert j.get_timer() == 1.0  # ... until it has been alone for peer_retry
    assert Dial(10_000) in j.handle_timer(1.0)
    # a job with a connection leaves the source alone, however many of its dials fail
    k = target(seed)
    out = k.handle_timer(0.0)
    k.attach("c", next(a.peer for a in out if isinstance(a, Dial)), Bitfield(8), False,
             True, 0.01)
    for step in range(1, 40):
        now = step * 0.5
        while dials := [a.peer for a in out if isinstance(a, Dial)]:
            assert 10_000 not in dials
            out = [b for peer in dials for b in k.dial_ended(peer, now)]
        out = k.handle_timer(now)
    out = k.detach("c", 20.0)  # alone again: the source once that lasted peer_retry
    while dials := [a.peer for a in out if isinstance(a, Dial)]:
        assert 10_000 not in dials
        out = [b for peer in dials for b in k.dial_ended(peer, 20.0)]
    out = k.handle_timer(20.5)
    assert Dial(10_000) not in out
    for a in out:
        if isinstance(a, Dial):
            k.dial_ended(a.peer, 20.5)
    assert Dial(10_000) in k.handle_timer(21.0)


def test_asks_up_to_layer_asks_peers_for_the_layer_then_pipelines_rarest_first() -> None:
    j = job(pieces=4, peers=[], pipeline=2, seed_pipeline=1, layer_asks=2)
    assert j.attach("e", 3, bf(4, []), has_layer=False, outbound=True, now=0.0) == []
    out = j.attach("s", 2, bf(4), has_layer=True, outbound=True, now=0.0)
    assert out == [RequestLayer("s")]
    assert j.attach("a", 1, bf(4, [0, 1]), has_layer=False, outbound=True, now=0.0) == \
        [RequestLayer("a")]  # a second peer at once: one that never answers costs no deadline
    assert j.attach("b", 4, bf(4), has_layer=True, outbound=True, now=0.0) == []  # two asked
    assert j.layer_arrived("s", True, 0.1) == []
    assert j.detach("b", 0.1) == []
    out = j.start(Bitfield(4), 0.1)
    assert sorted(requests(out, "a")) == [0, 1]  # the downloader first, full pipeline
    assert len(requests(out, "s")) == 1 and requests(out, "s")[0] in (2, 3)  # seed: 1


def test_a_piece_from_one_peer_cancels_its_end_game_twin_and_is_announced() -> None:
    j = job(pieces=1, peers=[])
    j.attach("a", 1, bf(1), False, True, 0.0)
    j.attach("b", 2, bf(1), False, True, 0.0)
    out = j.start(Bitfield(1), 0.0)
    assert len(requests(out)) == 1  # one piece left: the end game waits for it to be late
    assert j.get_timer() == 1.0  # endgame_after
    out = j.handle_timer(1.0)
    assert len(requests(out)) == 1  # ... then asks the other peer too
    assert j.piece_arrived("a", 0, 1.5)
    out = j.piece_written("a", 0, True, 1.5)
    assert Cancel("b", 0) in out and out[-1] == Complete()
    assert Announce("a", None) in out and Announce("b", None) in out  # have-all to both
    assert j.done and j.get_timer() is None


def test_a_corrupt_piece_bans_its_sender_and_its_requests_go_elsewhere() -> None:
    j = job(pieces=5, peers=[], pipeline=4)
    j.attach("a", 1, bf(5, [0, 1]), False, True, 0.0)
    assert sorted(requests(j.start(Bitfield(5), 0.0))) == [0, 1]
    assert sorted(requests(j.attach("b", 2, bf(5, [0, 1, 2, 3]), False, True, 0.0))) == [2, 3]
    out = j.piece_corrupt("a", 0, 1.0)
    assert Ban(1, "bad-data", "sent a corrupt piece 0") in out
    assert Close("a", "sent a corrupt piece 0") in out
    assert sorted(requests(out, "b")) == [0, 1]  # what a owed is asked of b at once
    assert 1 in j.banned and not j.owns("a")
    assert j.attach("a2", 1, bf(5), False, True, 2.0) == [Close("a2", "banned")]


def test_what_a_closed_connection_owed_is_asked_elsewhere_at_once() -> None:
    """Requests belong to connections: when one closes (a duplicate-connection tie-break, a
    reset), its pieces go to another connection at once, not after a deadline or the stall
    timeout (the issue's 30 s tail stall)."""
    j = job(pieces=5, peers=[], pipeline=4, request_timeout=30.0, stall_timeout=30.0)
    j.attach("a", 1, bf(5, [0, 1]), False, True, 0.0)
    assert sorted(requests(j.start(Bitfield(5), 0.0))) == [0, 1]
    assert sorted(requests(j.attach("b", 2, bf(5, [0, 1, 2, 3]), False, True, 0.0))) == [2, 3]
    out = j.detach("a", 0.1)
    assert sorted(requests(out, "b")) == [0, 1] and not j.owns("a")
    assert not any(isinstance(a, Ban) for a in out)  # closing is no offence
    assert j.outstanding("b") == 4


def test_unanswered_requests_expire_then_the_peer_is_banned() -> None:
    j = job(pieces=4, peers=[], pipeline=2, request_timeout=5.0, request_strikes=2,
            stall_timeout=100.0, flush_interval=100.0)
    j.attach("slow", 1, bf(4), False, True, 0.0)
    j.start(Bitfield(4), 0.0)
    assert j.handle_timer(4.9) == []
    out = j.handle_timer(j.get_timer() or 0)
    assert [a for a in out if isinstance(a, Cancel)] and not any(isinstance(a, Ban) for a in out)
    assert len(requests(out, "slow")) == 1  # snubbed: one request at a time
    out = j.handle_timer(j.get_timer() or 0)
    assert any(isinstance(a, Ban) and a.kind == "unresponsive" for a in out)


def test_stall_is_reported_then_fails_and_a_written_piece_clears_it() -> None:
    j = job(pieces=2, peers=[], stall_timeout=10.0)
    j.attach("a", 1, bf(2), False, True, 0.0)
    j.start(Bitfield(2), 0.0)
    assert [a for a in j.handle_timer(5.0) if isinstance(a, StateChanged)] == \
        [StateChanged(True, "no progress for 5s from 1 peer(s)")]
    j.piece_arrived("a", 0, 6.0)
    assert StateChanged(False, "") in j.piece_written("a", 0, True, 6.0)
    assert any(isinstance(a, Failed) for a in j.handle_timer(16.0))


def test_flushes_every_interval_and_pause_withdraws_what_is_in_flight() -> None:
    j = job(pieces=4, peers=[], flush_interval=1.0, stall_timeout=100.0)
    j.attach("a", 1, bf(4), False, True, 0.0)
    out = j.start(Bitfield(4), 0.0)
    assert j.get_timer() == 1.0 and Flush() in j.handle_timer(1.0)
    cancels = j.pause(1.5)
    assert sorted(c.index for c in cancels if isinstance(c, Cancel)) == sorted(requests(out))
    assert j.outstanding("a") == 0 and requests(j.peer_has("a", [0], 2.0)) == []
    assert len(requests(j.resume(3.0))) == len(requests(out))  # the seed's pipeline again


def test_duplicate_connections_keep_the_one_dialed_by_the_smaller_id() -> None:
    j = job(pieces=2, peers=[])  # we are node 0: our outbound connection wins
    j.attach("in", 5, bf(2), False, outbound=False, now=0.0)
    assert j.attach("out", 5, bf(2), False, outbound=True, now=0.0)[0] == \
        Close("in", "duplicate connection")
    assert j.owns("out") and not j.owns("in")


def upload() -> UploadScheduler[str, str, int]:
    return UploadScheduler[str, str, int](outbox=1, max_redirects=2, slots=2)


def test_a_seed_serves_each_piece_to_one_requester_and_redirects_the_others() -> None:
    u = upload()
    haves = {c: Bitfield(4) for c in "abc"}
    for i, c in enumerate("abc"):
        u.open(c, "blob", i, haves[c], 0.0)
    assert u.wanted("a", 0, priority=1, now=0.0) is None
    assert u.wanted("b", 0, 1, now=0.0) == Refuse("b", 0, "held by other peers")
    assert u.wanted("b", 0, 1, now=0.0) == Refuse("b", 0, "held by other peers")
    assert u.wanted("b", 0, 1, now=0.0) is None  # max_redirects reached: nobody starves
    assert u.next() == Serve("a", "blob", 0)
    u.sent("a", 0, 0.0)
    haves["a"].add(0)  # a announced it
    assert u.next() == Serve("b", "blob", 0)


def test_never_sent_pieces_first_and_slots_bound_what_is_on_its_way() -> None:
    u = upload()
    for i, c in enumerate("abc"):
        u.open(c, "blob", i, Bitfield(4), 0.0)
        u.set_downloading(c, True)  # peers we download from too: no redirects
    u.wanted("a", 0, 1, now=0.0)
    assert u.next() == Serve("a", "blob", 0)
    u.sent("a", 0, 0.0)
    u.wanted("b", 0, 1, now=0.0)  # sent once already
    u.wanted("c", 1, 1, now=0.0)  # never sent: goes first
    u.wanted("a", 2, 1, now=0.0)
    assert u.next() == Serve("c", "blob", 1)
    assert u.next() == Serve("a", "blob", 2)
    assert u.next() is None and u.in_flight == 2  # two slots, both taken
    u.close("a")  # its piece will never be reported: the slot is free again
    assert u.next() == Serve("b", "blob", 0)


def test_a_downloading_node_refuses_as_busy_while_its_slots_are_taken_and_one_waits() -> None:
    u = UploadScheduler[str, str, int](slots=1, busy_queue=1)
    for i, c in enumerate("abcd"):
        u.open(c, "blob", i, Bitfield(8), 0.0)
        u.set_downloading(c, c != "d")  # we download from a, b and c, not from d
    assert u.wanted("a", 0, 1, now=0.0) is None
    assert u.next() == Serve("a", "blob", 0)  # the one slot is taken
    assert u.wanted("b", 1, 1, now=0.0) is None and u.waiting == 1  # one may wait
    assert u.wanted("c", 2, 1, now=0.0) == Refuse("c", 2, REJECT_BUSY)  # c asks elsewhere
    assert u.wanted("d", 3, 1, now=0.0) is None  # not one we download from: queued
    u.sent("a", 0, 0.1)
    assert u.next() == Serve("b", "blob", 1) and u.waiting == 1
    u.cancelled("d", 3)
    assert u.waiting == 0 and u.wanted("c", 2, 1, now=0.1) is None  # room to wait again


def test_the_requester_holding_fewest_pieces_is_served_first() -> None:
    u = UploadScheduler[str, str, int](slots=1, busy_queue=None)
    u.open("rich", "blob", 1, bf(8, [0, 1, 2]), 0.0)
    u.open("poor", "blob", 2, bf(8, [0]), 0.0)
    u.open("none", "blob", 3, Bitfield(8), 0.0)
    for c, i in (("rich", 5), ("poor", 6), ("none", 7)):
        u.set_downloading(c, True)
        u.wanted(c, i, 1, now=0.0)
    order = []
    while (a := u.next()) is not None:
        assert isinstance(a, Serve)
        order.append(a.conn)
        u.sent(a.conn, a.index, 0.1)
    assert order == ["none", "poor", "rich"]  # a peer that holds nothing relays nothing


def test_a_busy_peer_is_asked_nothing_for_busy_backoff_then_one_piece_at_a_time() -> None:
    j = job(pieces=6, peers=[], pipeline=2, busy_backoff=0.05)
    j.attach("a", 1, bf(6, [0, 1, 2, 3, 4]), True, True, 0.0)
    j.attach("b", 2, bf(6, [0, 1, 2, 3, 4]), True, True, 0.0)
    out = j.start(Bitfield(6), 0.0)
    on_a, on_b = requests(out, "a"), requests(out, "b")
    assert len(on_a) == len(on_b) == 2  # four of the five pieces the peers hold
    assert j.refused("a", on_a[0], REJECT_BUSY, 0.0) == []  # b's pipeline is full, a waits
    assert j.refused("a", on_a[1], REJECT_BUSY, 0.01) == []
    when = j.get_timer()
    assert when is not None and when == pytest.approx(0.06)  # busy_backoff after the last refusal
    assert requests(j.handle_timer(0.055), "a") == []
    out = j.handle_timer(when)
    probe = requests(out, "a")
    assert len(probe) == 1  # three pieces are free, a is asked for one only ...
    assert probe[0] not in on_a  # ... and not for one it refused: those go to others first
    # a piece from a ends the probing: its pipeline is full again
    assert j.piece_arrived("a", probe[0], 0.1)
    assert sorted(requests(j.piece_written("a", probe[0], True, 0.1), "a")) == sorted(on_a)


def test_a_seed_that_sends_a_request_elsewhere_is_asked_one_piece_at_a_time_after_a_while(
        ) -> None:
    j = job(pieces=8, peers=[], seed_pipeline=3, elsewhere_backoff=0.2)
    j.attach("s", 1, bf(8), True, True, 0.0)  # a seed
    asked = requests(j.start(Bitfield(8), 0.0), "s")
    assert len(asked) == 3
    # others are getting that piece: asking the seed for another one at once would only
    # have it refuse that one too (9,000 requests in the source's first quarter second)
    assert requests(j.refused("s", asked[0], REJECT_ELSEWHERE, 0.01)) == []
    assert j.get_timer() == pytest.approx(0.21)
    assert requests(j.handle_timer(0.21)) == []  # two still on their way: nothing more yet
    assert j.piece_arrived("s", asked[1], 0.3)
    # a piece came: the seed is asked again, a full pipeline, for pieces it did not refuse
    again = requests(j.piece_written("s", asked[1], True, 0.3), "s")
    assert len(again) == 2 and asked[0] not in again
    for i in again:
        j.refused("s", i, REJECT_ELSEWHERE, 0.31)
    j.refused("s", asked[2], REJECT_ELSEWHERE, 0.32)
    assert requests(j.handle_timer(0.4)) == []  # within the backoff: nothing
    assert len(requests(j.handle_timer(0.53), "s")) == 1  # then one at a time


def test_a_connection_with_a_full_outbox_is_parked_until_its_piece_is_sent() -> None:
    u = UploadScheduler[str, str, int](outbox=1, slots=None)
    u.open("a", "blob", 1, Bitfield(4), 0.0)
    u.set_downloading("a", True)
    u.wanted("a", 0, 1, now=0.0)
    u.wanted("a", 1, 1, now=0.0)
    u.cancelled("a", 1)
    u.wanted("a", 2, 1, now=0.0)
    assert u.next() == Serve("a", "blob", 0)
    assert u.next() is None  # 2 is parked, 1 was cancelled
    u.sent("a", 0, 0.0)
    assert u.next() == Serve("a", "blob", 2)
    assert u.times_sent("blob", 0) == 1 and u.serving("blob") == 1


def test_a_peer_without_the_layer_at_hello_is_asked_once_it_announces_a_piece() -> None:
    j = job(pieces=4, peers=[])
    assert j.attach("a", 1, bf(4, []), has_layer=False, outbound=True, now=0.0) == []
    assert j.peer_has("a", [2], 1.0) == [RequestLayer("a")]  # it verified a piece: it has one
    assert j.attach("b", 2, bf(4, [0]), has_layer=False, outbound=True, now=1.0) == \
        [RequestLayer("b")]  # (up to layer_asks peers are asked at once)


def test_the_dial_retry_timer_fires_the_retry_despite_float_rounding() -> None:
    j = DownloadScheduler[str, int](4, 0, lambda: [1], 0.7,
                                    DownloadPolicy(peer_retry=0.1, stall_timeout=100.0))
    assert j.handle_timer(0.7) == [Dial(1)]
    assert j.dial_ended(1, 0.71) == []
    when = j.get_timer()
    assert when == 0.7 + 0.1 and when - 0.7 < 0.1  # the sum rounds below the interval
    assert j.handle_timer(when) == [Dial(1)]  # not an endless timer at the same instant


def test_unacknowledged_pieces_bound_the_room_and_count_as_held_by_their_receiver() -> None:
    u = UploadScheduler[str, str, int](outbox=2, slots=None, send_timeout=5.0)
    u.open("a", "blob", 1, Bitfield(8), 0.0, max_unacked=2)
    u.open("b", "blob", 2, Bitfield(8), 0.0)
    for i in range(3):
        u.wanted("a", i, 1, now=0.0)
    assert [u.next(), u.next(), u.next()] == [Serve("a", "blob", 0), Serve("a", "blob", 1), None]
    u.sent("a", 0, 1.0)
    u.sent("a", 1, 1.0)
    assert u.next() is None  # two pieces unacknowledged: no room until a's have says so
    assert u.get_timer() == 6.0
    assert u.wanted("b", 0, 1, now=3.0) is None  # a's claim lapsed (claim_ttl): queued
    assert u.next() == Refuse("b", 0, "held by other peers")  # on its way to a: held there
    assert u.acked("a", 0, 3.0) and not u.acked("a", 0, 3.0)
    assert u.next() == Serve("a", "blob", 2)
    # a's last acknowledgement (3.0) starts its quiet time, not piece 1 sent at 1.0
    assert u.get_timer() == 8.0
    assert u.handle_timer(7.9) == []
    assert u.handle_timer(8.0) == [Close("a", "no piece acknowledged for 5s")]


def test_a_slow_reader_that_keeps_acknowledging_is_not_closed() -> None:
    """Behind a deep queue every piece arrives late, but one arrives every few seconds: that
    peer reads (a slow link), unlike one that acknowledges nothing for ``send_timeout``."""
    u = UploadScheduler[str, str, int](outbox=2, slots=None, send_timeout=5.0)
    u.open("slow", "blob", 1, Bitfield(64), 0.0, max_unacked=8)
    u.open("dead", "blob", 2, Bitfield(64), 0.0, max_unacked=8)
    for i in range(8):
        u.wanted("slow", i, 1, now=0.0)
        u.wanted("dead", 8 + i, 2, now=0.0)
    while (serve := u.next()) is not None:
        assert isinstance(serve, Serve)
        u.sent(serve.conn, serve.index, 0.0)
    for t in range(1, 8):  # one acknowledgement every 3 s; the oldest piece waits 21 s
        now = 3.0 * t
        assert u.handle_timer(now) == ([Close("dead", "no piece acknowledged for 5s")]
                                       if t == 2 else [])
        if t == 2:
            u.close("dead")
        assert u.acked("slow", t - 1, now)
    assert u.handle_timer(21.0 + 4.9) == []


def test_a_claimant_that_acknowledges_nothing_for_claim_ttl_holds_no_claim() -> None:
    u = UploadScheduler[str, str, int](claim_ttl=2.0)
    u.open("a", "blob", 1, Bitfield(4), 0.0)
    u.open("b", "blob", 2, Bitfield(4), 0.0)
    assert u.wanted("a", 0, 1, now=1.0) is None
    assert u.wanted("b", 0, 1, now=2.0) == Refuse("b", 0, "held by other peers")
    assert u.wanted("b", 0, 1, now=2.5) is None  # a acknowledged nothing since 0.0


def test_a_claimant_asking_for_everything_holds_no_claim() -> None:
    """A peer asking a seed for more pieces than any download pipelines (a non-reader asks
    for every piece) keeps no claim: the others are served at once, not after CLAIM_TTL."""
    n = 4 * CLAIM_PENDING
    u = UploadScheduler[str, str, int](claim_ttl=2.0)
    u.open("greedy", "blob", 1, Bitfield(n), 0.0)
    u.open("fair", "blob", 2, Bitfield(n), 0.0)
    for i in range(CLAIM_PENDING):
        assert u.wanted("greedy", i, 1, now=0.1) is None
    # up to a pipeline's worth it holds its claims ...
    assert u.wanted("fair", 0, 1, now=0.2) == Refuse("fair", 0, "held by other peers")
    for i in range(CLAIM_PENDING, n):
        assert u.wanted("greedy", i, 1, now=0.3) is None
    # ... asking for everything, none
    assert [u.wanted("fair", i, 1, now=0.4) for i in (1, CLAIM_PENDING, n - 1)] == [None] * 3


@pytest.mark.parametrize("module", ["blobmesh.distribution.scheduler", "blobmesh.sim"])
def test_importing_a_core_imports_no_io(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('sqlite3', 'socket', 'threading', 'asyncio', 'ssl') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def _adaptive_sends(gaps: list[float]) -> UploadScheduler[str, str, str]:
    up = UploadScheduler[str, str, str](slots=2, max_slots=4)
    up.open("c", "blob", "peer", Bitfield(64), 0.0, max_unacked=None)
    now = 0.0
    for i, gap in enumerate(gaps):
        now += gap
        up.wanted("c", i, 1, now)
        assert isinstance(up.next(), Serve)
        up.sent("c", i, now)
    return up


def test_upload_slots_open_while_the_node_sends_below_its_peak_and_close_at_it() -> None:
    up = _adaptive_sends([0.01] * 12)  # at its peak: no more than the base slots
    assert up.slots == 2
    up = _adaptive_sends([0.01] * 12 + [0.05] * 8)  # held down: slots open, up to max
    assert up.slots == 4
    up = _adaptive_sends([0.01] * 12 + [0.05] * 8 + [0.005] * 30)  # back at the peak
    assert up.slots == 2


def test_fixed_upload_slots_do_not_adapt() -> None:
    up = UploadScheduler[str, str, str](slots=2)
    up.open("c", "blob", "peer", Bitfield(64), 0.0, max_unacked=None)
    for i, now in enumerate([0.01 * k for k in range(12)] + [1.0 + k for k in range(8)]):
        up.wanted("c", i, 1, now)
        assert isinstance(up.next(), Serve)
        up.sent("c", i, now)
    assert up.slots == 2


@pytest.mark.parametrize(("peers", "asked"), [([1, 0], 6), ([1, 0, 2], 2)])
def test_a_seed_gets_the_full_pipeline_only_when_nobody_else_could_relay(
        peers: list[int], asked: int) -> None:
    # candidates: the source first, then the scope (this node, 0, among them)
    j = job(pieces=16, peers=peers, pipeline=6, seed_pipeline=2)
    j.handle_timer(0.0)  # draws the dial plan
    j.attach("s", 1, bf(16), True, True, 0.0)  # the source, a seed
    assert len(requests(j.start(Bitfield(16), 0.0), "s")) == asked


def announced(actions: Sequence[object]) -> dict[object, list[int] | None]:
    return {a.conn: a.indices for a in actions if isinstance(a, Announce)}


def test_a_piece_is_announced_to_peers_that_lack_it_and_to_those_asked_for_it() -> None:
    """A seed takes our haves as the acknowledgement of what it sent (UploadScheduler.acked):
    the peer a piece came from, and every peer it was asked of, hear of it though they hold
    it; peers known to hold it and never asked do not."""
    j = job(pieces=4, peers=[], pipeline=1, seed_pipeline=1)
    j.attach("s", 1, bf(4), False, True, 0.0)  # a seed
    j.attach("h", 2, bf(4, [0, 1]), False, True, 0.0)  # holds 0 and 1
    j.attach("e", 3, bf(4, []), False, True, 0.0)  # holds nothing
    out = j.start(Bitfield(4), 0.0)
    asked = {a.conn: a.index for a in out if isinstance(a, Request)}
    assert set(asked) == {"s", "h"}
    index = asked["h"]
    assert j.piece_arrived("h", index, 0.1)
    assert announced(j.piece_written("h", index, True, 0.1)) == {"h": [index], "e": [index]}
    other = asked["s"]
    assert j.piece_arrived("s", other, 0.2)
    got = announced(j.piece_written("s", other, True, 0.2))
    assert got == ({"s": [other], "e": [other]} if other in (0, 1) else
                   {"s": [other], "h": [other], "e": [other]})


def test_haves_are_batched_within_the_announce_delay_and_at_most_announce_batch() -> None:
    j = job(pieces=8, peers=[], pipeline=8, seed_pipeline=8, announce_delay=0.05,
            announce_batch=3,
            flush_interval=100.0, stall_timeout=100.0)
    j.attach("a", 1, bf(8), False, True, 0.0)
    j.attach("e", 2, bf(8, []), False, True, 0.0)
    j.start(Bitfield(8), 0.0)
    assert j.piece_arrived("a", 0, 1.0)
    assert announced(j.piece_written("a", 0, True, 1.0)) == {"a": [0], "e": [0]}  # at once
    for i, t in ((1, 1.01), (2, 1.02)):
        assert j.piece_arrived("a", i, t) and announced(j.piece_written("a", i, True, t)) == {}
    assert j.get_timer() == pytest.approx(1.05)
    assert announced(j.handle_timer(1.05)) == {"a": [1, 2], "e": [1, 2]}
    for i, t in ((3, 1.06), (4, 1.07)):
        assert j.piece_arrived("a", i, t) and announced(j.piece_written("a", i, True, t)) == {}
    j.piece_arrived("a", 5, 1.08)
    assert announced(j.piece_written("a", 5, True, 1.08)) == {"a": [3, 4, 5], "e": [3, 4, 5]}
    for i in (6, 7):
        j.piece_arrived("a", i, 1.09)
        out = j.piece_written("a", i, True, 1.09)
    assert announced(out) == {"a": None, "e": None} and out[-1] == Complete()  # have-all


def test_the_end_game_duplicates_a_request_only_once_it_is_late() -> None:
    j = job(pieces=2, peers=[], pipeline=1, endgame_after=0.5)
    j.attach("a", 1, bf(2), False, True, 0.0)
    j.attach("b", 2, bf(2), False, True, 0.0)
    out = j.start(Bitfield(2), 0.0)
    first = {r.conn: r.index for r in out if isinstance(r, Request)}
    assert sorted(first.values()) == [0, 1]  # one request per piece
    assert j.piece_arrived("a", first["a"], 0.3)
    out = j.piece_written("a", first["a"], True, 0.3)
    assert requests(out) == []  # b's piece is in flight and not yet late: nothing doubled
    assert j.get_timer() == 0.5
    assert requests(j.handle_timer(0.49)) == []
    assert j.get_timer() == 0.5
    out = j.handle_timer(0.5)
    assert requests(out, "a") == [first["b"]]  # late: a is asked for it too
    # nothing else is due: the timer does not fire again at the same instant
    t = j.get_timer()
    assert t is None or t > 0.5
    assert j.piece_arrived("b", first["b"], 0.6)
    out = j.piece_written("b", first["b"], True, 0.6)
    assert Cancel("a", first["b"]) in out and out[-1] == Complete()


def test_with_endgame_after_zero_the_end_game_duplicates_at_once() -> None:
    j = job(pieces=1, peers=[], endgame_after=0.0)
    j.attach("a", 1, bf(1), False, True, 0.0)
    j.attach("b", 2, bf(1), False, True, 0.0)
    out = j.start(Bitfield(1), 0.0)
    assert len(requests(out)) == 2
