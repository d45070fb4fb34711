"""Request deadlines, strikes and bans (sans-I/O)."""

from __future__ import annotations

from blobmesh.distribution.requests import Expired, RequestLedger


def test_unanswered_requests_expire_and_are_handed_back() -> None:
    ledger = RequestLedger[str](timeout=5.0, max_strikes=3)
    ledger.sent("a", 1, now=0.0)
    ledger.sent("a", 2, now=1.0)
    ledger.sent("b", 3, now=0.0)
    assert ledger.get_timer() == 5.0
    assert ledger.handle_timer(4.9) == []
    ledger.answered("b", 3, now=4.0)
    assert ledger.handle_timer(5.0) == [Expired("a", (1, 2), strikes=1, ban=False)]
    assert ledger.outstanding("a") == 0 and ledger.get_timer() is None
    # a snubbed connection gets one request at a time until it answers
    assert ledger.snubbed("a") and ledger.room("a", 16) == 1 and ledger.room("b", 16) == 16


def test_an_answer_is_life_a_peer_that_keeps_answering_is_never_struck() -> None:
    ledger = RequestLedger[str](timeout=5.0)
    for t in range(0, 100, 4):  # a slow peer: one answer every 4 s, 16 requests queued
        for i in range(16):
            ledger.sent("slow", t * 16 + i, now=float(t))
        assert ledger.handle_timer(float(t) + 3.9) == []
        ledger.answered("slow", t * 16, now=float(t) + 3.9)
    assert not ledger.snubbed("slow")


def test_repeat_offenders_are_banned_and_an_answer_clears_strikes() -> None:
    ledger = RequestLedger[str](timeout=1.0, max_strikes=3)
    ledger.sent("x", 0, now=0.0)
    assert [e.ban for e in ledger.handle_timer(1.0)] == [False]
    ledger.sent("x", 0, now=1.0)
    ledger.answered("x", 0, now=1.5)  # it answered after all: strikes start over
    assert not ledger.snubbed("x")
    now = 2.0
    strikes = []
    for _ in range(3):
        ledger.sent("x", 7, now=now)
        now += 1.0
        strikes += [(e.strikes, e.ban) for e in ledger.handle_timer(now)]
    assert strikes == [(1, False), (2, False), (3, True)]


def test_withdrawn_and_dropped() -> None:
    ledger = RequestLedger[str](timeout=1.0)
    ledger.sent("a", 1, now=0.0)
    ledger.sent("a", 2, now=0.0)
    ledger.withdrawn("a", 1)  # cancelled by us: no answer owed
    assert ledger.dropped("a") == [2]
    assert ledger.handle_timer(10.0) == [] and ledger.dropped("a") == []


def test_the_deadline_follows_the_last_answer_and_forgets_idle_connections() -> None:
    ledger = RequestLedger[str](timeout=5.0)
    ledger.sent("a", 0, 0.0)
    ledger.sent("a", 1, 0.0)
    ledger.sent("b", 0, 1.0)
    assert ledger.get_timer() == 5.0
    ledger.answered("a", 0, 3.0)  # a answered: its deadline moves past b's
    assert ledger.get_timer() == 6.0
    ledger.answered("b", 0, 4.0)  # b owes nothing: a's is the only deadline
    assert ledger.get_timer() == 8.0
    assert [e.conn for e in ledger.handle_timer(8.0)] == ["a"] and ledger.get_timer() is None
