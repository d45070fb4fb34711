"""How often targets report progress to the source, and whom it asks when they fall silent."""

from __future__ import annotations

import random

from blobmesh.distribution.progress import (
    QUERY_AFTER,
    NoteSchedule,
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


def test_in_a_small_scope_a_target_notes_changes_and_the_last_byte_at_once() -> None:
    n = NoteSchedule(7, now=0.0, interval=0.25, budget=200.0, rng=random.Random(1))
    assert not n.stretched and n.every == 0.25
    assert n.progress("transferring", False, 0.0)  # the first report: at once
    assert not n.progress("transferring", False, 0.1)
    assert n.progress("stalled", False, 0.15)  # a change: at once
    assert not n.progress("stalled", False, 0.2)
    assert n.progress("stalled", True, 0.21)  # the last byte: at once
    assert n.progress("stalled", False, 0.5)  # then every interval
    assert n.final_delay() == 0.0


def test_in_a_large_scope_notes_stay_within_the_source_budget_whatever_happens_together(
        ) -> None:
    targets, budget, final_budget = 10_000, 200.0, 1000.0
    rng = random.Random(7)
    notes = [NoteSchedule(targets, now=0.0, budget=budget, final_budget=final_budget, rng=rng)
             for _ in range(targets)]
    assert notes[0].stretched and notes[0].every == 50.0
    # every target reports every 50 ms for 100 s (pieces arriving), and all of them change
    # state together at t = 30 s (a higher priority starts everywhere): count the notes
    per_second = [0] * 100
    sample = notes[:500]  # (the others behave alike)
    for step in range(2_000):
        now = step * 0.05
        state = "queued" if now >= 30.0 else "transferring"
        for n in sample:
            if n.progress(state, False, now):
                per_second[int(now)] += 1
    scale = targets / len(sample)
    assert max(per_second) * scale <= 2 * budget  # no burst: not at the start, not at 30 s
    assert sum(per_second) * scale <= 100 * budget * 1.1
    assert per_second[30] * scale <= 2 * budget  # the state change rode on periodic notes
    # the phase runs from the first report: targets whose first pieces all come at 20 s
    # (the layer took a while) do not all note them then
    late = [NoteSchedule(targets, now=0.0, rng=rng) for _ in range(500)]
    assert sum(n.progress("transferring", False, 20.0) for n in late) <= 10
    # the final notes of targets completing together spread over targets / final_budget
    delays = [n.final_delay() for n in notes]
    assert min(delays) >= 0.0 and max(delays) <= targets / final_budget
    by_second = [0] * 10
    for d in delays:
        by_second[min(9, int(d))] += 1
    assert max(by_second) <= 1.2 * final_budget
