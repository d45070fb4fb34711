"""The event loop: time order, ties in scheduling order, cancellation, seeded randomness."""

from __future__ import annotations

from blobmesh.sim.engine import Simulator


def test_events_run_in_time_order_and_ties_in_scheduling_order() -> None:
    sim = Simulator(seed=1)
    seen: list[tuple[float, str]] = []
    sim.at(2.0, lambda: seen.append((sim.now, "b")))
    sim.at(1.0, lambda: seen.append((sim.now, "a")))
    sim.at(2.0, lambda: seen.append((sim.now, "c")))
    dropped = sim.after(1.5, lambda: seen.append((sim.now, "x")))
    dropped.cancel()
    sim.run()
    assert seen == [(1.0, "a"), (2.0, "b"), (2.0, "c")]
    assert sim.events_run == 3


def test_run_stops_at_until_and_on_stop_and_ticks() -> None:
    sim = Simulator()
    ticks: list[float] = []

    def again() -> None:
        sim.after(0.5, again)

    sim.at(0.0, again)
    sim.run(until=3.0, on_tick=ticks.append, tick=1.0)
    assert sim.now == 3.0 and [round(t) for t in ticks] == [1, 2, 3]
    sim.at(3.2, sim.stop)
    sim.run()
    assert 3.2 <= sim.now < 3.5


def test_a_seed_fixes_every_draw() -> None:
    assert [Simulator(7).rng.random() for _ in range(2)] == \
        [Simulator(7).rng.random() for _ in range(2)]
    assert Simulator(7).rng.random() != Simulator(8).rng.random()
