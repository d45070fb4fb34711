"""The dashboard's sans-I/O views: liveness, rates, ETAs, the events log, row deltas."""

from __future__ import annotations

from typing import Any

from blobmesh.dashboard.model import (
    DEAD_AFTER,
    EventLog,
    History,
    RateMeter,
    TargetDelta,
    eta,
    liveness,
    summarize,
    target_rates,
)


def status(state: str = "active", targets: list[dict[str, Any]] | None = None
           ) -> dict[str, Any]:
    targets = targets or []
    return {"handle": "d-0000000000000001", "blob": "bm1" + "a" * 52, "size": 100,
            "scope": "all", "priority": "normal", "state": state, "started": 1.0,
            "finished": None,
            "totals": {"targets": len(targets),
                       "completed": sum(t["state"] == "completed" for t in targets),
                       "failed": sum(t["state"] == "failed" for t in targets),
                       "bytes_done": sum(t["bytes_done"] for t in targets),
                       "bytes_total": 100 * len(targets)},
            "targets": targets}


def target(node: str, state: str, done: int, rate: float = 0.0, reason: str = ""
           ) -> dict[str, Any]:
    return {"node": node, "state": state, "bytes_done": done, "rate": rate, "reason": reason,
            "updated": 1.0, "peers": 0, "sources": [], "source_rates": []}


def test_liveness_suspect_until_silent_for_dead_after() -> None:
    assert liveness(True, 0.0, 1000.0) == "alive"
    assert liveness(False, 100.0, 100.0 + DEAD_AFTER - 0.1) == "suspect"
    assert liveness(False, 100.0, 100.0 + DEAD_AFTER) == "dead"


def test_eta_only_when_moving() -> None:
    assert eta(50, 150, 10.0) == 10.0
    assert eta(50, 150, 0.0) is None
    assert eta(150, 150, 10.0) is None


def test_rate_meter_slides_over_its_window() -> None:
    m = RateMeter(window=2.0)
    assert m.update(0.0, 0) == 0.0
    assert m.update(1.0, 100) == 100.0
    assert m.update(2.0, 200) == 100.0
    for t in range(3, 10):
        m.update(float(t), 200)  # stalled
    assert m.update(10.0, 200) == 0.0


def test_summary_sums_transferring_rates_and_estimates() -> None:
    s = status(targets=[target("a", "transferring", 50, 10.0),
                        target("b", "completed", 100, 99.0),
                        target("c", "pending", 0)])
    row = summarize(s, 0.0)
    assert (row["targets"], row["completed"], row["bytes_done"]) == (3, 1, 150)
    assert row["rate"] == 10.0
    assert row["eta"] == 15.0
    done = summarize(status("completed", [target("a", "completed", 100, 5.0)]), 0.0)
    assert done["rate"] == 0.0 and done["eta"] is None


def test_target_rates_per_node_over_active_distributions() -> None:
    rates = target_rates([status(targets=[target("a", "transferring", 1, 5.0)]),
                          status(targets=[target("a", "transferring", 1, 2.0),
                                          target("b", "pending", 0, 9.0)]),
                          status("cancelled", [target("b", "transferring", 1, 7.0)])])
    assert rates == {"a": 7.0}


def test_target_delta_sends_each_change_once() -> None:
    d = TargetDelta("d-0000000000000001")
    rows = [target("a", "pending", 0), target("b", "pending", 0)]
    assert len(d.changed(rows)) == 2
    assert d.changed(rows) == []
    rows[1] = target("b", "transferring", 10, 1.0)
    assert [r["node"] for r in d.changed(rows)] == ["b"]


def test_event_log_reports_changes_after_the_first_view() -> None:
    log = EventLog(size=3)
    log.observe(0.0, {"n1": "alive"}, [status()])
    assert log.since(0) == []  # the first view is the baseline
    log.observe(1.0, {"n1": "suspect", "n2": "alive"},
                [status(targets=[target("n1", "failed", 0, reason="node unreachable")])])
    texts = [e.text for e in log.since(0)]
    assert any("n1" in t and "suspect" in t for t in texts)
    assert any("n2" in t and "joined" in t for t in texts)
    assert any("failed: node unreachable" in t for t in texts)
    seq = log.last_seq
    log.observe(2.0, {"n2": "alive"}, [status("cancelled")])
    new = [e.text for e in log.since(seq)]
    assert any("left the space" in t for t in new) and any("cancelled" in t for t in new)
    assert len(log.since(0)) == 3  # bounded


def test_history_one_point_per_step_while_active() -> None:
    h = History(step=1.0, points=3)
    for i in range(10):
        h.record(i * 0.5, [{"handle": "d", "state": "active", "rate": float(i)}])
    assert [p[0] for p in h.series("d")] == [2.0, 3.0, 4.0]
    h.record(5.0, [{"handle": "d", "state": "completed", "rate": 0.0}])
    h.record(6.0, [{"handle": "d", "state": "completed", "rate": 0.0}])
    assert h.series("d")[-1] == (5.0, 0.0)  # one closing zero, then nothing
    h.record(0.0, [{"handle": "x", "state": "completed", "rate": 0.0}])
    assert h.series("x") == []
