"""How often targets report progress to the source."""

from __future__ import annotations

from blobmesh.distribution.progress import progress_note_interval


def test_progress_notes_to_the_source_stay_within_its_budget_at_any_scope_size() -> None:
    assert progress_note_interval(7, 0.25, 200.0) == 0.25  # small scopes: four a second
    for targets in (100, 1_000, 10_000, 100_000):
        every = progress_note_interval(targets, 0.25, 200.0)
        assert targets / every <= 200.0 + 1e-9
    assert progress_note_interval(10_000, 0.25, 200.0) == 50.0
