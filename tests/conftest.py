"""Shared fixtures: a fresh store home per test, a fleet of real node processes; no node
process of any test logs a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blobmesh.node.fleet import Fleet
from blobmesh.store import Store


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def store(home: Path) -> Iterator[Store]:
    with Store(home) as s:
        yield s


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Real ``node run`` processes under ``tmp_path``, stopped after the test (their logs are
    checked by ``_no_traceback_in_node_logs``)."""
    with Fleet(tmp_path) as f:
        yield f


@pytest.fixture(autouse=True)
def _no_traceback_in_node_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail a test if a node process of any :class:`Fleet` it made logged a traceback, or
    an error no task owner retrieved (logged without one, as a counted ERROR line): normal
    use (cancels, clients that go away, restarts) must do neither."""
    fleets: list[Fleet] = []
    init = Fleet.__init__

    def tracked(self: Fleet, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        fleets.append(self)

    monkeypatch.setattr(Fleet, "__init__", tracked)
    yield
    for fleet in fleets:
        fleet.stop()  # a traceback at exit counts too (stopped ones are not touched)
    assert [tb for fleet in fleets for tb in fleet.tracebacks()] == []
    unhandled = [line for fleet in fleets for n in fleet.nodes
                 for line in n.stderr().splitlines() if " ERROR " in line
                 and "unhandled error" in line]
    assert unhandled == []
