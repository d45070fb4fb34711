"""Rate-limited warnings: one line per interval with a count, not one per event."""

from __future__ import annotations

import logging

import pytest

from blobmesh.logutil import RateLimitedLog


def test_repeats_become_one_line_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    warn = RateLimitedLog(logging.getLogger("t"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="t"):
        assert warn.warning("refused", "refused %s", "a")
        for i in range(99):
            now[0] += 0.05
            assert not warn.warning("refused", "refused %s", i)
        assert warn.info("other", "another kind")  # kinds are limited separately
        now[0] = 12.0
        assert warn.warning("refused", "refused %s", "b")
    assert [r.getMessage() for r in caplog.records] == [
        "refused a", "another kind", "refused b (and 99 more like it in the last 12s)"]
    assert caplog.records[0].levelno == logging.WARNING
