"""Max-min fair sharing of node links by flows, on hand-computed cases."""

from __future__ import annotations

import random

import pytest

from blobmesh.sim.engine import Simulator
from blobmesh.sim.network import FlowNetwork


def fleet(*caps: tuple[float, float]) -> tuple[Simulator, FlowNetwork]:
    sim = Simulator()
    net = FlowNetwork(sim)
    for up, down in caps:
        net.add_node(up, down)
    return sim, net


def test_one_uplink_is_shared_equally_and_a_finished_flow_frees_its_share() -> None:
    sim, net = fleet((10, 10), (100, 100), (100, 100))
    done: list[float] = []
    a = net.start(0, 1, 5.0, lambda: done.append(sim.now))
    b = net.start(0, 2, 15.0, lambda: done.append(sim.now))
    assert (a.rate, b.rate) == (5.0, 5.0)
    sim.run()
    assert done == pytest.approx([1.0, 2.0])  # 5 bytes at 5/s, then 10 left at 10/s
    assert net.bytes_sent[0] == 20.0


def test_a_flow_limited_elsewhere_leaves_its_share_to_the_others() -> None:
    # node 0 uploads 10/s to node 1 (downloads 4/s) and node 2: max-min gives 4 and 6
    _, net = fleet((10, 10), (100, 4), (100, 100))
    a = net.start(0, 1, 100.0, lambda: None)
    b = net.start(0, 2, 100.0, lambda: None)
    assert (a.rate, b.rate) == pytest.approx((4.0, 6.0))


def test_a_shared_resource_caps_every_flow_together() -> None:
    # the machine's CPU (12/s) under two flows on disjoint links: each gets 6, and one
    # limited to 2 by its own downlink leaves 10 to the other
    _, net = fleet((10, 10), (10, 10), (10, 10), (10, 2))
    net.share(12.0)
    a = net.start(0, 1, 100.0, lambda: None)
    b = net.start(2, 3, 100.0, lambda: None)
    assert (a.rate, b.rate) == pytest.approx((10.0, 2.0))
    c = net.start(1, 2, 100.0, lambda: None)
    assert (a.rate, b.rate, c.rate) == pytest.approx((5.0, 2.0, 5.0))
    net.abort(b)
    assert (a.rate, c.rate) == pytest.approx((6.0, 6.0))


def test_two_senders_share_one_downlink() -> None:
    _, net = fleet((10, 10), (10, 10), (10, 10), (100, 100))
    f1 = net.start(0, 2, 100.0, lambda: None)  # 0 -> 2
    f2 = net.start(1, 2, 100.0, lambda: None)  # 1 -> 2: node 2's downlink splits 5/5
    f3 = net.start(0, 3, 100.0, lambda: None)  # 0 -> 3: node 0's uplink splits 5/5
    assert (f1.rate, f2.rate, f3.rate) == pytest.approx((5.0, 5.0, 5.0))
    net.abort(f1)  # 0 -> 3 takes node 0's whole uplink, 1 -> 2 node 2's downlink
    assert (f2.rate, f3.rate) == pytest.approx((10.0, 10.0))
    assert net.bytes_sent[0] == 0.0


def test_no_link_is_ever_oversubscribed() -> None:
    rng = random.Random(3)
    sim = Simulator()
    net = FlowNetwork(sim)
    n = 12
    for _ in range(n):
        net.add_node(rng.choice([1.0, 5.0, 10.0]), rng.choice([2.0, 10.0]))
    worst = [0.0]

    def check() -> None:
        for node in range(n):
            out = sum(f.rate for f in net.flows_of(node) if f.src == node)
            into = sum(f.rate for f in net.flows_of(node) if f.dst == node)
            worst[0] = max(worst[0], out - net.up(node), into - net.down(node))

    def spawn() -> None:
        a, b = rng.sample(range(n), 2)
        net.start(a, b, rng.uniform(1, 20), check)
        check()
        if sim.now < 50:
            sim.after(rng.expovariate(4.0), spawn)

    sim.at(0.0, spawn)
    sim.run()
    assert worst[0] <= 1e-9
    assert not any(net.flows_of(i) for i in range(n))  # every flow finished
