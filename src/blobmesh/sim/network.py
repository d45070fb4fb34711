"""A flow-level (fluid) network: every node has an upload and a download capacity, and the
flows crossing a node's link share it max-min fairly.

A flow is one message of known size (a piece) from one node to another.  Its rate is fixed
between events; rates are recomputed by progressive filling only when a flow starts or ends,
and only for the flows that share a link with it (the ones whose rates that event changes
first).  Flows further away keep their rates until an event of their own: capacity is never
oversubscribed, but a little of it may stay unused until the next event on that link — with
piece-sized flows such events come every few tens of milliseconds.  Latency is added by the
caller when it delivers what a finished flow carried.

:meth:`FlowNetwork.share` adds one resource every flow crosses besides its two links: the CPU
of a machine all the nodes run on (the lab: 16 nodes on 2 cores), sized in bytes delivered per
second.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

from blobmesh.sim.engine import Simulator, Timer

_EPS = 1e-9


class Flow:
    """Bytes on their way from ``src`` to ``dst``."""

    __slots__ = ("args", "dst", "links", "on_done", "rate", "remaining", "since", "size",
                 "src", "timer")

    def __init__(self, src: int, dst: int, size: float, on_done: Callable[..., None],
                 args: tuple[Any, ...], shared: int | None = None) -> None:
        self.src = src
        self.dst = dst
        # the sender's uplink, the receiver's downlink (see FlowNetwork), the shared resource
        self.links = (2 * src, 2 * dst + 1) if shared is None else (2 * src, 2 * dst + 1, shared)
        self.size = size
        self.remaining = size
        self.rate = 0.0
        self.since = 0.0
        self.on_done = on_done
        self.args = args
        self.timer: Timer | None = None


class FlowNetwork:
    """Nodes with capacities (bytes/s) and the flows between them."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self._cap: list[float] = []  # link 2i: node i's uplink, 2i+1: its downlink
        self._used: list[float] = []
        self._flows: list[dict[Flow, None]] = []
        self.bytes_sent: list[float] = []  # per node, of finished and aborted flows
        self.reallocations = 0
        self._shared: int | None = None

    def add_node(self, up: float, down: float) -> int:
        """A node with these capacities (bytes/s); returns its index."""
        if up <= 0 or down <= 0:
            raise ValueError("link capacities must be positive")
        self._cap += [up, down]
        self._used += [0.0, 0.0]
        self._flows += [{}, {}]
        self.bytes_sent.append(0.0)
        return len(self.bytes_sent) - 1

    def share(self, capacity: float) -> None:
        """From now on every flow also crosses one resource of ``capacity`` bytes/s (the CPU
        of the one machine all the nodes run on)."""
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._shared = len(self._cap)
        self._cap.append(capacity)
        self._used.append(0.0)
        self._flows.append({})

    def up(self, node: int) -> float:
        return self._cap[2 * node]

    def down(self, node: int) -> float:
        return self._cap[2 * node + 1]

    def flows_of(self, node: int) -> list[Flow]:
        """The flows leaving and entering ``node``."""
        return [*self._flows[2 * node], *self._flows[2 * node + 1]]

    def upload_rate(self, node: int) -> float:
        return self._used[2 * node]

    def start(self, src: int, dst: int, size: float, on_done: Callable[..., None],
              *args: Any) -> Flow:
        """Start sending ``size`` bytes; ``on_done(*args)`` when the last byte left."""
        flow = Flow(src, dst, max(size, 1.0), on_done, args, self._shared)
        flow.since = self.sim.now
        for link in flow.links:
            self._flows[link][flow] = None
        self._reallocate(flow.links)
        return flow

    def abort(self, flow: Flow) -> None:
        """Stop a flow (its node crashed, its connection closed); ``on_done`` is not called."""
        if flow not in self._flows[2 * flow.src]:
            return
        self._settle(flow)
        self.bytes_sent[flow.src] += flow.size - flow.remaining
        self._remove(flow)
        self._reallocate(flow.links)

    def _settle(self, flow: Flow) -> None:
        now = self.sim.now
        flow.remaining = max(0.0, flow.remaining - flow.rate * (now - flow.since))
        flow.since = now

    def _remove(self, flow: Flow) -> None:
        if flow.timer is not None:
            flow.timer.cancel()
        for link in flow.links:
            del self._flows[link][flow]
            self._used[link] = max(0.0, self._used[link] - flow.rate)

    def _finished(self, flow: Flow) -> None:
        flow.timer = None
        self.bytes_sent[flow.src] += flow.size
        self._remove(flow)
        self._reallocate(flow.links)
        flow.on_done(*flow.args)

    def _reallocate(self, seeds: tuple[int, ...]) -> None:
        """Progressive filling of the flows on the ``seeds`` links (see the module doc)."""
        flows = self._flows
        affected = dict.fromkeys(flows[seeds[0]])
        for link in seeds[1:]:
            affected.update(flows[link])
        if not affected:
            return
        self.reallocations += 1
        cap, used = self._cap, self._used
        now = self.sim.now
        residual: dict[int, float] = {}
        count: dict[int, int] = {}
        get = residual.get
        for f in affected:  # (runs on every flow start and end: inlined, no calls)
            rate = f.rate
            left = f.remaining - rate * (now - f.since)
            f.remaining = left if left > 0.0 else 0.0
            f.since = now
            for link in f.links:
                r = get(link)
                if r is None:
                    residual[link] = cap[link] - used[link] + rate
                    count[link] = 1
                else:
                    residual[link] = r + rate
                    count[link] += 1
        heap = [(residual[link] / n, link) for link, n in count.items()]
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        rates: dict[Flow, float] = {}
        while heap:
            share, link = pop(heap)
            n = count[link]
            if n == 0:
                continue
            r = residual[link]
            current = (r if r > 0.0 else 0.0) / n
            if current > share + _EPS:
                push(heap, (current, link))  # stale: its share grew since pushed
                continue
            for f in flows[link]:
                if f not in rates and f in affected:
                    rates[f] = current
                    for other in f.links:
                        residual[other] -= current
                        count[other] -= 1
            count[link] = 0
        at, finished = self.sim.at, self._finished
        for f, rate in rates.items():
            old = f.rate
            timer = f.timer
            if timer is not None:
                if abs(rate - old) <= _EPS * max(1.0, rate):
                    continue
                timer.cancel()
                f.timer = None
            delta = rate - old
            for link in f.links:
                used[link] += delta
            f.rate = rate
            if rate > 0:
                f.timer = at(now + f.remaining / rate, finished, f)


__all__ = ["Flow", "FlowNetwork"]
