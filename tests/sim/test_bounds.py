"""The Kumar–Ross bound on known cases."""

from __future__ import annotations

import pytest

from blobmesh.sim.bounds import kumar_ross


def test_equal_links_give_f_over_u() -> None:
    assert kumar_ross(100.0, 10.0, [10.0] * 7, [10.0] * 7) == pytest.approx(10.0)
    assert kumar_ross(100.0, 10.0, [10.0] * 10_000, [10.0] * 10_000) == pytest.approx(10.0)


def test_each_term_can_be_the_binding_one() -> None:
    # a slow server: it must send every byte once
    assert kumar_ross(100.0, 1.0, [10.0, 10.0], [10.0, 10.0]) == pytest.approx(100.0)
    # one slow downloader
    assert kumar_ross(100.0, 10.0, [10.0, 2.0], [10.0, 10.0]) == pytest.approx(50.0)
    # peers that cannot upload: N·F over the total upload
    assert kumar_ross(100.0, 10.0, [100.0] * 4, [0.0] * 4) == pytest.approx(40.0)
    # heterogeneous (the lab's mixed case): 7 targets, 4 at 100, 3 at 20
    ups = [100.0, 20.0] * 3 + [100.0]
    assert kumar_ross(700.0, 100.0, ups, ups) == pytest.approx(35.0)


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        kumar_ross(1.0, 1.0, [], [])
    with pytest.raises(ValueError):
        kumar_ross(1.0, 0.0, [1.0], [1.0])
