"""How often targets report progress to the source, and whom it asks when they fall silent."""

from __future__ import annotations

from blobmesh.distribution.progress import (
    QUERY_AFTER,
    progress_note_interval,
    query_after,
    targets_to_query,
)


def test_progress_notes_to_the_source_stay_within_its_budget_at_any_scope_size() -> None:
    assert progress_note_interval(7, 0.25, 200.0) == 0.25  # small scopes: four a second
    for targets in (100, 1_000, 10_000, 100_000):
        every = progress_note_interval(targets, 0.25, 200.0)
        assert targets / every <= 200.0 + 1e-9
    assert progress_note_interval(10_000, 0.25, 200.0) == 50.0


def test_a_source_waits_longer_for_silent_targets_in_large_scopes() -> None:
    assert query_after(7, 0.25, 200.0) == QUERY_AFTER
    assert query_after(10_000, 0.25, 200.0) == 100.0  # two of their 50 s note intervals


def test_the_source_asks_the_longest_silent_targets_first_within_its_budget() -> None:
    heard = {n: float(n % 100) for n in range(10_000)}  # last notes at t = 0..99 s
    asked = {n: 150.0 for n in range(0, 10_000, 2)}  # the even ones were asked at t = 150
    picked = targets_to_query(heard, asked, range(10_000), now=160.0, silent_for=100.0,
                              budget=200)
    assert len(picked) == 200  # 5,000 are due: the budget bounds the burst
    assert all(n % 2 == 1 for n in picked)  # asked 10 s ago: not again yet
    assert max(heard[n] for n in picked) <= 3.0  # silent the longest: heard at t <= 3
    # nobody is due before silent_for has passed, and a zero budget asks nobody
    assert targets_to_query(heard, {}, range(10_000), now=99.0, silent_for=100.0,
                            budget=200) == []
    assert targets_to_query(heard, {}, range(10_000), now=500.0, silent_for=1.0,
                            budget=0) == []
    # a target never heard from (a restarted source knows only the scope) is due too
    assert targets_to_query({}, {}, ["x"], now=11.0, silent_for=10.0, budget=5) == ["x"]
