"""Piece picking: rarest first, one request per piece until the end game, bans."""

from __future__ import annotations

import random
import time

from blobmesh.distribution.picker import PiecePicker
from blobmesh.types import Bitfield


def bf(size: int, indices: list[int]) -> Bitfield:
    b = Bitfield(size)
    b.update(indices)
    return b


def test_rarest_first() -> None:
    p = PiecePicker[str](Bitfield(5), rng=random.Random(1))
    p.add_peer("a", bf(5, [0, 1, 2, 3]))
    p.add_peer("b", bf(5, [0, 1, 2]))
    p.add_peer("c", bf(5, [0, 1]))
    assert p.pick("a", 1) == [3]  # only a has 3
    assert p.pick("a", 1) == [2]  # then 2 (two holders)
    assert sorted(p.pick("a", 2)) == [0, 1]


def test_seed_is_asked_only_for_what_no_downloader_holds() -> None:
    p = PiecePicker[str](Bitfield(4), rng=random.Random(2))
    p.add_peer("seed", bf(4, [0, 1, 2, 3]))
    p.add_peer("b", bf(4, [0, 1]))
    assert sorted(p.pick("seed", 4)) == [2, 3]
    assert sorted(p.pick("b", 4)) == [0, 1]
    assert p.in_endgame()
    # in the end game the seed may duplicate what a slow downloader was asked for
    assert sorted(p.pick("seed", 4)) == [0, 1]


def test_no_duplicate_requests_before_endgame() -> None:
    p = PiecePicker[str](Bitfield(3))
    p.add_peer("a", bf(3, [0, 1, 2]))
    p.add_peer("b", bf(3, [0, 1, 2]))
    first = p.pick("a", 2)
    second = p.pick("b", 2)
    assert len(first) == 2 and len(second) == 1
    assert not set(first) & set(second)


def test_endgame_duplicates_and_cancels() -> None:
    p = PiecePicker[str](Bitfield(2))
    p.add_peer("a", bf(2, [0, 1]))
    p.add_peer("b", bf(2, [0, 1]))
    assert sorted(p.pick("a", 2)) == [0, 1]
    assert p.in_endgame()
    dup = p.pick("b", 2)
    assert sorted(dup) == [0, 1]
    assert p.received("a", 0) == ["b"]  # b's duplicate request for 0 can be cancelled
    assert p.pick("b", 2) == []  # b already has 1 in flight, 0 is done


def test_failed_request_frees_piece_and_ban_forgets_peer() -> None:
    p = PiecePicker[str](Bitfield(2))
    p.add_peer("a", bf(2, [0, 1]))
    p.add_peer("b", bf(2, [0]))
    assert p.pick("b", 1) == [0]
    p.failed("b", 0)
    assert p.ban("b") == []
    assert p.is_banned("b") and p.pick("b", 1) == []
    assert sorted(p.pick("a", 2)) == [0, 1]


def test_peer_has_updates_availability() -> None:
    p = PiecePicker[str](bf(3, [0]))
    p.add_peer("a", Bitfield(3))
    assert not p.interesting("a")
    p.peer_has("a", 2)
    assert p.interesting("a")
    assert p.pick("a", 5) == [2]
    p.received("a", 2)
    assert p.missing() == 1


def test_deferred_piece_is_asked_of_others_first() -> None:
    p = PiecePicker[str](Bitfield(3), rng=random.Random(3))
    p.add_peer("a", bf(3, [0, 1]))
    p.defer("a", 0)  # "a" told us to get piece 0 elsewhere
    assert p.pick("a", 1) == [1]
    p.failed("a", 1)
    p.received("b", 1)
    assert p.pick("a", 1) == [0]  # nothing else left: "a" is asked again


def test_end_game_only_for_the_tail() -> None:
    p = PiecePicker[str](Bitfield(40))
    p.add_peer("a", Bitfield.full(40))
    p.add_peer("b", bf(40, list(range(20))))
    p.add_peer("c", bf(40, list(range(20, 40))))
    taken = p.pick("b", 20) + p.pick("c", 20)
    assert sorted(taken) == list(range(40))
    assert not p.in_endgame()  # 40 missing pieces are not a tail: no duplicates yet
    assert p.pick("a", 5) == []
    for i in range(36):
        p.received("b" if i < 20 else "c", i)
    assert p.in_endgame()
    assert sorted(p.pick("a", 5)) == [36, 37, 38, 39]


def test_after_an_empty_pick_what_a_peer_announces_is_picked_and_nothing_is_lost() -> None:
    # the picker remembers that a peer's pick came up empty and then looks only at what it
    # announced since: picking fewer than that must leave the rest pickable, and a request
    # lost elsewhere must make its piece pickable from every peer holding it
    p = PiecePicker[str](Bitfield(32), rng=random.Random(3))
    p.add_peer("a", bf(32, list(range(8))))
    p.add_peer("b", Bitfield(32))
    assert len(p.pick("a", 8)) == 8
    assert p.pick("b", 4) == []  # holds nothing
    for i in (20, 21, 22):
        p.peer_has("b", i)
    first = p.pick("b", 1)
    assert len(first) == 1 and first[0] in (20, 21, 22)
    rest = p.pick("b", 4)
    assert sorted(first + rest) == [20, 21, 22]  # not lost after the first pick
    assert p.pick("b", 4) == []
    p.peer_has("b", 3)  # asked of a already
    assert p.pick("b", 4) == []
    p.failed("a", 3)  # lost there: b, which holds it too, may be asked now
    assert p.pick("b", 4) == [3]


def test_a_pick_costs_far_less_than_a_pass_over_the_pieces() -> None:
    # a 4 GiB blob of 16,384 pieces from one seed: a pick that looked at every missing piece
    # (as the picker once did, with a Python key per piece) made a download quadratic.  The
    # baseline is one pass over the pieces in C (building their set), timed in the same
    # test so that a loaded machine slows both; the best of several rounds of each.
    n, rounds, picks = 16_384, 5, 64
    p = PiecePicker[str](Bitfield(n), rng=random.Random(4))
    p.add_peer("seed", Bitfield.full(n))
    got: list[int] = []
    pick_s, scan_s = float("inf"), float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(picks):
            chosen = p.pick("seed", 4)
            for i in chosen:
                p.received("seed", i)
            got += chosen
        pick_s = min(pick_s, (time.perf_counter() - t) / picks)
        t = time.perf_counter()
        for _ in range(picks):
            set(range(n))
        scan_s = min(scan_s, (time.perf_counter() - t) / picks)
    assert len(set(got)) == len(got) == rounds * picks * 4
    assert pick_s < scan_s / 10, (pick_s, scan_s)


def test_rarest_first_follows_availability_as_it_changes() -> None:
    # each peer's candidates are ordered once and kept: a piece gaining holders, a peer
    # leaving (pieces losing them) and a lost request must all still give the rarest piece
    p = PiecePicker[str](Bitfield(6), rng=random.Random(5))
    p.add_peer("a", bf(6, [0, 1, 2, 3, 4, 5]))
    p.add_peer("b", bf(6, [0, 1, 2, 3]))
    p.add_peer("c", Bitfield(6))
    assert p.pick("b", 1) in ([0], [1], [2], [3])  # (orders b's candidates)
    p.failed("b", p.in_flight("b")[0])
    for i in (0, 1, 2):
        p.peer_has("c", i)
    assert p.pick("b", 1) == [3]  # the only piece of b's that c does not hold

    p = PiecePicker[str](Bitfield(3), rng=random.Random(6))
    p.add_peer("a", bf(3, [0, 1, 2]))
    p.add_peer("b", bf(3, [0, 1]))
    for peer in ("c", "e"):
        p.add_peer(peer, bf(3, [0]))
    p.add_peer("d", bf(3, [1]))
    assert p.pick("b", 1) == [1]  # 3 holders, 0 has 4
    p.failed("b", 1)  # lost: back among b's candidates
    p.remove_peer("c")
    p.remove_peer("e")
    assert p.pick("b", 1) == [0]  # 2 holders now, 1 has 3


def test_late_end_game_waits_for_the_request_to_age() -> None:
    p = PiecePicker[str](Bitfield(1), endgame_after=1.0)
    p.add_peer("a", bf(1, [0]))
    p.add_peer("b", bf(1, [0]))
    assert p.pick("a", 1, now=2.0) == [0]
    assert p.in_endgame()
    assert p.endgame_due(2.0) == 3.0
    assert p.pick("b", 1, now=2.9) == []  # not late yet
    assert p.endgame_due(3.0) is None  # (due by then: the caller has looked)
    assert p.pick("b", 1, now=3.0) == [0]
    assert p.endgame_due(0.0) is None  # two copies: none to spare
    assert p.received("b", 0) == ["a"]
