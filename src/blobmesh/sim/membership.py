"""Membership at scale: N nodes running the space's real membership and dissemination cores.

Every node holds a :class:`~blobmesh.space.membership.Membership` (SWIM failure detection,
seeds, maintenance rounds) and a :class:`~blobmesh.space.dissemination.Dissemination` (gossip
schedule, push targets), woken like the real node's driver: one timer per node, re-armed to the
earliest core after every event.  The simulator executes their actions the way
:class:`~blobmesh.space.space.Space` does — probes and ping-reqs with the same timeouts,
anti-entropy rounds (hello, state, and when the peer digests differ the walk down the prefix
tree of node ids with :mod:`blobmesh.space.peertree` on each node's tree of its records, the
listing of the differing prefixes, the diff and the records pushed back), pushes with one relay
hop, the join sequence (sync with the seed, then announce with the seed as relayer), re-signing
a record every ``record_ttl × republish_margin`` — over a modelled network: a one-way latency
per node, every message's size taken from the real wire encoding (:mod:`blobmesh.space.wire`)
and a real signed record.

Modelled, not real: the peer store is a map node → record version per node (the records every
node held at the start are shared, each node keeps only what changed since; its tree likewise:
the shared tree XOR a tree of the changes, :class:`Overlay`), links are always
connected (no dial or handshake cost), and nothing is lost on the way.  Faults: crashed nodes
stop answering; CPU-starved nodes run every timer and handle every message they receive 2–5 s
late (in order), as a starved event loop does.
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import math
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from blobmesh.sim.engine import Simulator, Timer
from blobmesh.space import peertree, wire
from blobmesh.space.config import Limits, Seed, Timing
from blobmesh.space.dissemination import Dissemination, FetchFrom, GossipWith, Push
from blobmesh.space.membership import BootstrapRound, Maintain, Membership
from blobmesh.space.metrics import Metrics
from blobmesh.space.records import sign_record
from blobmesh.space.swim import Alive, Probe, ProbeVia, Unresponsive
from blobmesh.transport.identity import Identity, NodeId

# --- message sizes from the real encoding ------------------------------------------------------


def _size(msg: wire.Request | wire.Response) -> int:
    return len(wire.encode(msg))


def _record_size() -> int:
    """A real signed record: two addresses, one group, two capabilities."""
    ident = Identity.generate()
    raw = sign_record(ident, space="blobmesh",
                      addresses=["203.0.113.17:7447", "[2001:db8::17]:7447"], groups=["workers"],
                      capabilities={"arch": "x86_64", "mem_gb": 64},
                      created_at=1_764_650_000_000, expires_at=1_764_653_600_000)
    return len(raw)


_D = b"\xaa" * 32
_RID = 1 << 20  # request ids are varints: a busy link's are this large
_SESSION = b"\xaa" * 16
RECORD = _record_size()
PING = _size(wire.Ping(_RID))
ACK = _size(wire.Ack(_RID))
NACK = _size(wire.Nack(_RID))
PING_REQ = _size(wire.PingReq(_RID, _D))
HELLO = _size(wire.GossipHello(_RID, _SESSION, _D, _D, b"", 0))  # from a node listing all
# a node holding more than LEAF records sends its root's children in the hello
HELLO_WALK = _size(wire.GossipHello(_RID, _SESSION, _D, _D,
                                    bytes(peertree.FANOUT * peertree.DIGEST_BYTES), 0xffff))
STATE = _size(wire.GossipState(_RID, _D, _D, [], b""))
_SUMMARY0 = _size(wire.PeerSummary(_RID, _SESSION, [], [], True))
SUMMARY_ENTRY = _size(wire.PeerSummary(_RID, _SESSION, [], [(_D, 1_764_650_000_000)], True)) \
    - _SUMMARY0
_DIFF0 = _size(wire.PeerDiff(_RID, [], []))
WANT_ENTRY = _size(wire.PeerDiff(_RID, [], [_D])) - _DIFF0
_PUSH0 = _size(wire.PushRecords(_RID, [], True))
LIST_ENTRY = _size(wire.PushRecords(_RID, [b"\xaa" * RECORD], True)) - _PUSH0  # a record in a list


def summary_bytes(prefixes: list[int], entries: int, limits: Limits) -> int:
    """The pages of ``g-peers`` listing ``entries`` records under ``prefixes``."""
    pages = max(1, math.ceil(entries / limits.max_elements))
    return (pages - 1) * _SUMMARY0 + _size(wire.PeerSummary(_RID, _SESSION, prefixes, [], True)) \
        + entries * SUMMARY_ENTRY


class Overlay:
    """One node's tree of entries: the tree every member held at the start (if it holds those
    records) with the changes it stored since, XORed in."""

    __slots__ = ("adj", "base")

    def __init__(self, base: peertree.PeerTree | None, adj: peertree.PeerTree) -> None:
        self.base = base
        self.adj = adj

    def count(self, prefix: int) -> int:
        return self.adj.count(prefix) + (self.base.count(prefix) if self.base else 0)

    def digest(self, prefix: int) -> int:
        return self.adj.digest(prefix) ^ (self.base.digest(prefix) if self.base else 0)

    def root(self) -> bytes:
        if self.base is None:
            return self.adj.root()
        return bytes(x ^ y for x, y in zip(self.adj.root(), self.base.root(), strict=True))


def walk(mine: peertree.TreeView, theirs: peertree.TreeView,
         limits: Limits) -> tuple[int, int, int, list[int]]:
    """A round whose roots differ walking down the tree as
    :class:`~blobmesh.space.gossip.GossipInitiator` and the responder's
    :func:`~blobmesh.space.peertree.differ` do it: the bytes the walk adds to the state, the
    bytes of the ``g-tree`` steps after it (sent, received), and the prefixes then listed."""
    if peertree.leaf(mine, peertree.ROOT):
        return 0, 0, 0, [peertree.ROOT]

    def step(asked: list[int]) -> tuple[wire.PeerTreeReq, wire.PeerTreeDiff, list[int],
                                        list[int]]:
        masks, digests = peertree.masks(mine, asked), peertree.child_digests(mine, asked)
        differing, below = peertree.differ(theirs, asked, digests, masks)
        return (wire.PeerTreeReq(_RID, _SESSION, asked, digests, masks),
                wire.PeerTreeDiff(_RID, differing, below),
                *peertree.descend(mine, asked, masks, differing, below))

    _, first, splitting, listed = step([peertree.ROOT])  # in the hello and the state
    state = _size(wire.GossipState(_RID, _D, _D, first.prefixes, first.digests)) - STATE
    sent = received = 0
    n = max(1, limits.max_elements // peertree.FANOUT)
    while splitting:
        req, resp, deeper, more = step(splitting[:n])
        splitting = splitting[n:] + deeper
        listed += more
        sent += _size(req)
        received += _size(resp)
    return state, sent, received, listed


def records_bytes(records: int, base: int, limits: Limits) -> int:
    """PushRecords or PeerDiff with ``records`` records (chunked at ``max_elements``)."""
    chunks = max(1, math.ceil(records / limits.max_elements))
    return chunks * base + records * LIST_ENTRY


def nid(i: int) -> NodeId:
    """The cores treat node ids as opaque, ordered keys: the simulator's are ints."""
    return cast("NodeId", i)


def _token(node: int, version: int) -> bytes:
    """What a push carries through the core in place of a signed record."""
    return node.to_bytes(4, "big") + version.to_bytes(4, "big")


def _untoken(raw: bytes) -> tuple[int, int]:
    return int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:], "big")


# --- the scenario -----------------------------------------------------------------------------


@dataclass(slots=True)
class MembershipScenario:
    """Everything a run depends on (times in seconds)."""

    nodes: int = 100             # members at the start (all know each other)
    seed: int = 0
    duration: float = 30.0       # virtual time simulated
    joins: int = 10              # nodes joining, spread over the window
    crash_fraction: float = 0.0  # of the members, crashing once in the window
    settle: float = 12.0         # the window: from 2 s to this long before the end
    starved_fraction: float = 0.0  # of the members, CPU-starved for the whole run
    starve_lag: tuple[float, float] = (2.0, 5.0)  # how late their timers and messages run
    latency_ms: float = 0.5      # one way from a node to the switch (jittered ±50 %)
    timing: Timing = field(default_factory=Timing)
    limits: Limits = field(default_factory=Limits)

    @property
    def window(self) -> tuple[float, float]:
        """When joins and crashes happen: each has ``settle`` seconds to be seen."""
        return 2.0, max(2.0, self.duration - self.settle)


@dataclass(slots=True)
class JoinResult:
    node: int
    at: float
    t99_s: float | None     # from the join until 99 % of the live nodes held its record
    known_by: float         # fraction of the live nodes holding it at the end


@dataclass(slots=True)
class MembershipResult:
    """What one run measured (JSON-ready through :meth:`to_json`)."""

    scenario: MembershipScenario
    nodes: int
    joins: list[JoinResult]
    join_t99_s_max: float | None      # the slowest join to reach 99 % (None: one never did)
    join_t99_s_p50: float | None
    crashed: int
    crash_detect_s_max: float | None  # crash → first node marking it unresponsive, slowest
    crash_marked_by_p50: float        # nodes that marked a crashed node, per crashed node
    starved: int
    false_deaths_healthy: int         # healthy nodes marked unresponsive by anyone
    false_deaths_starved: int         # starved (but running) nodes marked unresponsive
    false_marks: int                  # unresponsive marks of running nodes, all told
    bytes_out_per_s_node_p50: float
    bytes_out_per_s_node_p99: float
    bytes_out_per_s_node_max: float
    bytes_in_per_s_node_p50: float
    bytes_in_per_s_node_max: float
    bytes_per_s_by_kind: dict[str, float]  # per node, sent
    gossip_rounds_per_s_node: float
    differing_rounds: float  # fraction of rounds whose peer digests differed
    events: int
    wall_s: float
    mem_per_node_kib: float

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        sc = out.pop("scenario")
        out["scenario"] = {k: v for k, v in sc.items() if k not in ("timing", "limits")}
        out["joins"] = [dataclasses.asdict(j) for j in self.joins]
        return out


# --- a node ----------------------------------------------------------------------------------



class _View:
    """What the dissemination core reads of a simulated node's membership."""

    def __init__(self, node: _Node) -> None:
        self._n = node

    def alive_peers(self) -> list[NodeId]:
        return cast("list[NodeId]", self._n.alive)

    def seed_ids(self) -> list[NodeId]:
        return list(self._n.members.seeds)

    def known_records(self) -> int:
        return self._n.count

    def active(self) -> bool:
        return True


class _Call:
    """A request waiting for its answer or its timeout, whichever its node handles first."""

    __slots__ = ("done", "on_done", "timer")

    def __init__(self, on_done: Callable[[bool, Any], None]) -> None:
        self.done = False
        self.on_done = on_done
        self.timer: Timer | None = None

    def finish(self, ok: bool, payload: Any = None) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self.on_done(ok, payload)


class _Node:
    __slots__ = ("alive", "base", "bytes_in", "bytes_out", "count", "crashed", "delta",
                 "dis", "handled_at", "id", "latency", "members", "pushes", "republish_at",
                 "started", "starved", "timer", "tree", "when")

    def __init__(self, i: int, sc: MembershipScenario, rng: random.Random, *, latency: float,
                 started: float) -> None:
        self.id = i
        self.latency = latency
        self.starved = False
        self.started = started
        self.crashed = False
        self.base = False       # holds the records every member held at the start
        self.delta: dict[int, int] = {}  # node -> record version, where it differs from base
        self.tree = peertree.PeerTree()  # the entries of delta, those of base it replaced out
        self.count = 0          # records held, ours included
        self.alive: list[int] = []  # known, not us, not marked unresponsive; sorted
        self.bytes_out = 0
        self.bytes_in = 0
        self.pushes = 0         # in flight
        self.handled_at = 0.0   # a starved node handles what it receives in order
        self.republish_at = float("inf")
        self.timer: Timer | None = None
        self.when = float("inf")
        metrics = Metrics()
        core_rng = random.Random(rng.getrandbits(64))
        self.members = Membership(sc.timing, max_seeds=sc.limits.max_seeds, bootstrap=False,
                                  rng=core_rng, metrics=metrics)
        self.dis = Dissemination(sc.timing, sc.limits, _View(self), rng=core_rng,
                                 metrics=metrics)


Serve = Callable[[Callable[[int, Any], None]], None]


class _Fleet:
    """The nodes, the network between them, and the adapter executing their cores' actions."""

    def __init__(self, sc: MembershipScenario) -> None:
        self.sc = sc
        self.sim = Simulator(sc.seed)
        self.rng = self.sim.rng
        self.base_n = sc.nodes
        # node ids (the trees' keys): random like public keys, drawn apart from the run's
        # random choices; the records every member holds at the start are at version 1
        ids = random.Random(f"ids {sc.seed}")
        self.ids = [ids.randbytes(32) for _ in range(sc.nodes + sc.joins)]
        self.base_tree = peertree.PeerTree()
        for x in range(sc.nodes):
            self.base_tree.toggle(self.ids[x], 1)
        self.nodes: list[_Node] = []
        self.kind_bytes: dict[str, int] = {}
        self.rounds = 0
        self.differing = 0
        self.learned: dict[int, list[tuple[float, int]]] = {}  # joiner -> (when, by whom)
        self.join_at: dict[int, float] = {}
        self.crash_at: dict[int, float] = {}
        self.first_mark: dict[int, float] = {}
        self.marked_by: dict[int, set[int]] = {}
        self.false_marks = 0
        self.falsely_marked: set[int] = set()

    # --- the network -------------------------------------------------------------------------

    def view(self, n: _Node) -> Overlay:
        return Overlay(self.base_tree if n.base else None, n.tree)

    def version(self, n: _Node, of: int) -> int:
        v = n.delta.get(of)
        if v is not None:
            return v
        return 1 if n.base and of < self.base_n else 0

    def _lag(self, n: _Node) -> float:
        lo, hi = self.sc.starve_lag
        return self.rng.uniform(lo, hi) if n.starved else 0.0

    def account(self, src: _Node, dst: _Node, nbytes: int, kind: str) -> None:
        """Count ``nbytes`` more of a message from ``src`` that ``dst`` received."""
        src.bytes_out += nbytes
        dst.bytes_in += nbytes
        self.kind_bytes[kind] = self.kind_bytes.get(kind, 0) + nbytes

    def send(self, src: _Node, dst: _Node, nbytes: int, kind: str,
             fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` runs at ``dst`` once the message arrived and ``dst`` got to it."""
        src.bytes_out += nbytes
        self.kind_bytes[kind] = self.kind_bytes.get(kind, 0) + nbytes
        at = self.sim.now + src.latency + dst.latency
        if dst.starved:
            at = max(at + self._lag(dst), dst.handled_at)
            dst.handled_at = at
        self.sim.at(at, self._deliver, dst, nbytes, fn, args)

    def _deliver(self, dst: _Node, nbytes: int, fn: Callable[..., None],
                 args: tuple[Any, ...]) -> None:
        if dst.crashed:
            return
        dst.bytes_in += nbytes
        fn(*args)
        self.arm(dst)

    def local_timer(self, n: _Node, delay: float, fn: Callable[..., None], *args: Any) -> Timer:
        return self.sim.at(self.sim.now + delay + self._lag(n), self._local, n, fn, args)

    def _local(self, n: _Node, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        if n.crashed:
            return
        fn(*args)
        self.arm(n)

    def request(self, src: _Node, dst: _Node, nbytes: int, kind: str, timeout: float,
                serve: Serve, done: Callable[[bool, Any], None]) -> None:
        """A request and its response; ``done(ok, payload)`` runs at ``src`` once."""
        call = _Call(done)

        def reply(resp_bytes: int, payload: Any) -> None:  # at dst
            self.send(dst, src, resp_bytes, kind, call.finish, True, payload)

        self.send(src, dst, nbytes, kind, self._serve, src, dst, serve, reply)
        call.timer = self.local_timer(src, timeout, call.finish, False)

    def _serve(self, src: _Node, dst: _Node, serve: Serve,
               reply: Callable[[int, Any], None]) -> None:
        if self.version(dst, src.id):  # any message of a member proves it is alive
            self.apply_swim(dst, dst.members.heard_from(nid(src.id)))
        serve(reply)

    # --- the driver --------------------------------------------------------------------------

    def arm(self, n: _Node) -> None:
        if n.crashed:
            return
        when = min(n.members.get_timer(), n.dis.get_timer())
        if n.timer is not None and n.timer.active and when == n.when:
            return
        if n.timer is not None:
            n.timer.cancel()
        n.when = when
        n.timer = None
        if when != float("inf"):
            n.timer = self.sim.at(when + self._lag(n), self._fire, n)

    def _fire(self, n: _Node) -> None:
        if n.crashed:
            return
        now = max(self.sim.now, n.when)
        n.timer = None
        for action in n.members.handle_timer(now):
            match action:
                case Maintain():
                    self._maintain(n)
                case BootstrapRound():
                    pass
                case _:
                    self.apply_swim(n, [action])
        for d_action in n.dis.handle_timer(now):
            match d_action:
                case GossipWith():
                    self.gossip(n, self.nodes[cast("int", d_action.peer)])
                case FetchFrom():  # no ops in this simulation
                    raise AssertionError(d_action)
        self.arm(n)

    # --- records -----------------------------------------------------------------------------

    def apply(self, n: _Node, items: list[tuple[int, int]], base: bool = False) -> list[
            tuple[int, int]]:
        """Store newer records at ``n``; returns those that changed."""
        changed: list[tuple[int, int]] = []
        new: list[int] = []
        if base and not n.base:
            n.base = True
            for x in [x for x in range(self.base_n) if x not in n.delta]:
                new.append(x)
            n.count += len(new)
            for x, v in list(n.delta.items()):
                if x < self.base_n:
                    n.tree.toggle(self.ids[x], 1, -1)  # held before base brought it
                    if v == 1:  # keep delta canonical: base at version 1
                        del n.delta[x]
        for x, v in items:
            old = self.version(n, x)
            if v <= old:
                continue
            if old:
                n.tree.toggle(self.ids[x], old, -1)
            n.tree.toggle(self.ids[x], v)
            if not (n.base and x < self.base_n and v == 1):
                n.delta[x] = v
            changed.append((x, v))
            if old == 0:
                n.count += 1
                new.append(x)
        for x in new:
            if x == n.id:
                continue
            n.members.joined(nid(x))
            n.dis.member_joined(nid(x))
            _insort(n.alive, x)
            if x in self.join_at and not self.nodes[x].crashed:
                self.learned[x].append((self.sim.now, n.id))
        if changed or new:
            n.dis.news()
        return changed

    def _maintain(self, n: _Node) -> None:
        if self.sim.now < n.republish_at:
            return
        t = self.sc.timing
        n.republish_at = self.sim.now + t.record_ttl * t.republish_margin
        v = self.version(n, n.id) + 1
        self.apply(n, [(n.id, v)])
        self.announce(n, [(n.id, v)], exclude=None)

    def announce(self, n: _Node, items: list[tuple[int, int]], exclude: int | None,
                 relayers: int | None = None, prefer: tuple[int, ...] = ()) -> None:
        pushes = n.dis.announce("records", [_token(x, v) for x, v in items],
                                None if exclude is None else nid(exclude), in_flight=n.pushes,
                                relayers=relayers, prefer=[nid(p) for p in prefer])
        for p in pushes:
            self.push(n, self.nodes[cast("int", p.peer)], p)

    def push(self, n: _Node, dst: _Node, p: Push) -> None:
        items = [_untoken(r) for r in p.raws]
        n.pushes += 1

        def serve(reply: Callable[[int, Any], None]) -> None:  # at dst
            changed = self.apply(dst, items)
            if changed and p.relay:
                self.announce(dst, changed, exclude=n.id, relayers=0)
            reply(ACK, None)

        def done(_ok: bool, _: Any) -> None:
            n.pushes -= 1

        self.request(n, dst, records_bytes(len(items), _PUSH0, self.sc.limits), "push",
                     self.sc.timing.request_timeout, serve, done)

    # --- anti-entropy ------------------------------------------------------------------------

    def gossip(self, a: _Node, b: _Node, after: Callable[[], None] | None = None) -> None:
        """One round of ``a`` with ``b`` as :class:`~blobmesh.space.gossip.GossipInitiator`
        and :class:`~blobmesh.space.gossip.GossipResponder` run it."""
        if not a.dis.begin_round(nid(b.id)):
            return
        self.rounds += 1
        t, lim = self.sc.timing, self.sc.limits

        def over(_ok: bool = True, _: Any = None) -> None:
            a.dis.round_over(nid(b.id))
            if after is not None:
                after()
            self.arm(a)

        def state(reply: Callable[[int, Any], None]) -> None:  # at b
            reply(STATE, None)

        def on_state(ok: bool, _: Any) -> None:  # at a
            if not ok:
                return over()
            mine, theirs = self.view(a), self.view(b)
            if mine.root() == theirs.root():
                return over()
            self.differing += 1
            state, sent, received, listed = walk(mine, theirs, lim)
            self.account(b, a, state, "gossip-tree")  # with the state
            if not sent:
                return list_prefixes(listed)
            # the walk's round trips are one exchange here: they add only latency
            self.request(a, b, sent, "gossip-tree", t.request_timeout,
                         lambda reply: reply(received, None),
                         lambda ok, _: list_prefixes(listed) if ok else over())

        def list_prefixes(listed: list[int]) -> None:  # at a
            entries = sum(self.view(a).count(p) for p in listed)
            self.request(a, b, summary_bytes(listed, entries, lim), "gossip-diff",
                         t.request_timeout, diff, on_diff)

        def diff(reply: Callable[[int, Any], None]) -> None:  # at b: what a lacks, b wants
            base = b.base and not a.base
            send = [(x, v) for x, v in b.delta.items() if v > self.version(a, x)]
            want = [x for x, v in a.delta.items() if v > self.version(b, x)]
            want_base = a.base and not b.base
            records = len(send) + (self.base_n if base else 0)
            wanted = len(want) + (self.base_n if want_base else 0)
            reply(records_bytes(records, _DIFF0, lim) + wanted * WANT_ENTRY,
                  (send, base, want, want_base))

        def on_diff(ok: bool, payload: Any) -> None:  # at a
            if not ok:
                return over()
            send, base, want, want_base = payload
            self.apply(a, send, base)
            if not want and not want_base:
                return over()
            items = [(x, self.version(a, x)) for x in want]

            def store(reply: Callable[[int, Any], None]) -> None:  # at b
                self.apply(b, items, want_base)
                reply(ACK, None)

            records = len(items) + (self.base_n if want_base else 0)
            self.request(a, b, records_bytes(records, _PUSH0, lim), "gossip-diff",
                         t.request_timeout, store, over)

        hello = HELLO if peertree.leaf(self.view(a), peertree.ROOT) else HELLO_WALK
        self.request(a, b, hello, "gossip-digest", t.request_timeout, state, on_state)

    # --- failure detection -------------------------------------------------------------------

    def apply_swim(self, n: _Node, effects: list[Probe | ProbeVia | Unresponsive | Alive]
                   ) -> None:
        for eff in effects:
            match eff:
                case Probe():
                    self._probe(n, cast("int", eff.target), eff.seq, eff.timeout)
                case ProbeVia():
                    self._probe_via(n, cast("int", eff.target), eff.seq,
                                    [cast("int", h) for h in eff.via])
                case Unresponsive():
                    self._marked(n, cast("int", eff.target))
                case Alive():
                    target = cast("int", eff.target)
                    if self.version(n, target):
                        _insort(n.alive, target)

    def _acked(self, n: _Node, target: int, seq: int) -> None:
        self.apply_swim(n, n.members.acked(nid(target), seq))

    def ping(self, n: _Node, target: int, within: float,
             done: Callable[[bool], None]) -> None:
        def answer(reply: Callable[[int, Any], None]) -> None:
            reply(ACK, None)

        def on_ack(ok: bool, _: Any) -> None:
            if ok and self.version(n, target):
                self.apply_swim(n, n.members.heard_from(nid(target)))
            done(ok)

        self.request(n, self.nodes[target], PING, "probe", within, answer, on_ack)

    def _probe(self, n: _Node, target: int, seq: int, within: float) -> None:
        def done(ok: bool) -> None:
            if ok:
                self._acked(n, target, seq)

        self.ping(n, target, within, done)

    def _probe_via(self, n: _Node, target: int, seq: int, via: list[int]) -> None:
        t = self.sc.timing
        answers: list[bool] = []

        def asked(ok: bool, payload: Any) -> None:  # like asyncio.gather: all, then any
            answers.append(ok and bool(payload))
            if len(answers) == len(via) and any(answers):
                self._acked(n, target, seq)

        for h in via:
            helper = self.nodes[h]

            def serve(reply: Callable[[int, Any], None], helper: _Node = helper) -> None:
                if target == n.id:
                    return reply(NACK, False)
                self.ping(helper, target, t.indirect_timeout * 0.8,
                          lambda ok: reply(ACK if ok else NACK, ok))

            self.request(n, helper, PING_REQ, "probe", t.indirect_timeout, serve, asked)

    def _marked(self, n: _Node, target: int) -> None:
        i = _bisect_index(n.alive, target)
        if i is not None:
            del n.alive[i]
        node = self.nodes[target]
        if node.crashed:
            self.first_mark.setdefault(target, self.sim.now)
            self.marked_by.setdefault(target, set()).add(n.id)
        else:
            self.false_marks += 1
            self.falsely_marked.add(target)

    # --- the fleet ---------------------------------------------------------------------------

    def _latency(self) -> float:
        return self.sc.latency_ms / 1000 * self.rng.uniform(0.5, 1.5)

    def build(self) -> None:
        sc, t = self.sc, self.sc.timing
        everyone = list(range(self.base_n))
        for i in everyone:
            n = _Node(i, sc, self.rng, latency=self._latency(), started=0.0)
            n.base = True
            n.count = self.base_n
            n.alive = everyone[:i] + everyone[i + 1:]
            joined = n.members.joined
            for x in n.alive:
                joined(nid(x))
            n.republish_at = self.rng.uniform(0, t.record_ttl * t.republish_margin)
            self.nodes.append(n)
        order = list(everyone)
        self.rng.shuffle(order)
        n_starved = round(sc.starved_fraction * self.base_n)
        n_crash = round(sc.crash_fraction * self.base_n)
        for i in order[:n_starved]:
            self.nodes[i].starved = True
        for i in order[n_starved:n_starved + n_crash]:
            self.sim.at(self.rng.uniform(*sc.window), self._crash, self.nodes[i])
        for n in self.nodes:
            start = self.rng.uniform(0, t.probe_interval)  # not all in step
            self.sim.at(start, self._start, n)
        for k in range(sc.joins):
            first, last = sc.window
            at = first + (last - first) * (k + self.rng.random()) / sc.joins
            self.sim.at(at, self._join, self.base_n + k)

    def _start(self, n: _Node) -> None:
        n.members.start(self.sim.now)
        n.dis.start(self.sim.now)
        self.arm(n)

    def _crash(self, n: _Node) -> None:
        n.crashed = True
        self.crash_at[n.id] = self.sim.now
        if n.timer is not None:
            n.timer.cancel()

    def _join(self, i: int) -> None:
        """What :meth:`Space.start` and :meth:`Space.join` do, the seed a random live member."""
        n = _Node(i, self.sc, self.rng, latency=self._latency(), started=self.sim.now)
        assert len(self.nodes) == i
        self.nodes.append(n)
        self.join_at[i] = self.sim.now
        self.learned[i] = []
        n.delta[i] = 1
        n.tree.toggle(self.ids[i], 1)
        n.count = 1
        # through a starved seed a join fails: every request of the sync times out
        live = [x for x in range(self.base_n)
                if not self.nodes[x].crashed and not self.nodes[x].starved]
        seed = live[self.rng.randrange(len(live))]
        n.members.add_seed(Seed(nid(seed)))
        self._start(n)

        def announce() -> None:
            self.announce(n, [(i, 1)], exclude=None, prefer=(seed,))

        self.gossip(n, self.nodes[seed], after=announce)

    # --- results -----------------------------------------------------------------------------

    def result(self, wall: float, mem_kib: float) -> MembershipResult:
        sc = self.sc
        end = self.sim.now
        live = [n for n in self.nodes if not n.crashed]
        joins: list[JoinResult] = []
        for j, at in self.join_at.items():
            if self.nodes[j].crashed:
                continue
            # the nodes that were there when it joined and still are
            others = sum(1 for n in live if n.started < at)
            times = sorted(w for w, by in self.learned[j]
                           if not self.nodes[by].crashed and self.nodes[by].started < at)
            need = math.ceil(0.99 * others)
            t99 = times[need - 1] - at if need and len(times) >= need else None
            joins.append(JoinResult(j, round(at, 3), None if t99 is None else round(t99, 3),
                                    round(len(times) / max(1, others), 4)))
        t99s = [j.t99_s for j in joins]
        done = [x for x in t99s if x is not None]
        crashed = sorted(self.crash_at)
        detect = [self.first_mark[c] - self.crash_at[c] for c in crashed if c in self.first_mark]
        starved = {n.id for n in self.nodes if n.starved}
        out_rates = sorted(n.bytes_out / max(1e-9, end - n.started) for n in live)
        in_rates = sorted(n.bytes_in / max(1e-9, end - n.started) for n in live)
        node_s = sum(end - n.started for n in self.nodes)
        return MembershipResult(
            scenario=sc, nodes=len(self.nodes), joins=joins,
            join_t99_s_max=None if len(done) < len(t99s) or not done else max(done),
            join_t99_s_p50=statistics.median(done) if done else None,
            crashed=len(crashed),
            crash_detect_s_max=(round(max(detect), 3)
                                if detect and len(detect) == len(crashed) else None),
            crash_marked_by_p50=(statistics.median(len(self.marked_by.get(c, ()))
                                                   for c in crashed) if crashed else 0.0),
            starved=len(starved),
            false_deaths_healthy=len(self.falsely_marked - starved),
            false_deaths_starved=len(self.falsely_marked & starved),
            false_marks=self.false_marks,
            bytes_out_per_s_node_p50=round(_pct(out_rates, 50), 1),
            bytes_out_per_s_node_p99=round(_pct(out_rates, 99), 1),
            bytes_out_per_s_node_max=round(out_rates[-1], 1),
            bytes_in_per_s_node_p50=round(_pct(in_rates, 50), 1),
            bytes_in_per_s_node_max=round(in_rates[-1], 1),
            bytes_per_s_by_kind={k: round(v / node_s, 1)
                                 for k, v in sorted(self.kind_bytes.items())},
            gossip_rounds_per_s_node=round(self.rounds / node_s, 3),
            differing_rounds=round(self.differing / max(1, self.rounds), 4),
            events=self.sim.events_run, wall_s=round(wall, 2), mem_per_node_kib=round(mem_kib, 1))


def _insort(xs: list[int], x: int) -> None:
    i = bisect.bisect_left(xs, x)
    if i == len(xs) or xs[i] != x:
        xs.insert(i, x)


def _bisect_index(xs: list[int], x: int) -> int | None:
    i = bisect.bisect_left(xs, x)
    return i if i < len(xs) and xs[i] == x else None


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def _rss_kib() -> float:
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def run(sc: MembershipScenario,
        progress: Callable[[float], None] | None = None) -> MembershipResult:
    """Simulate ``sc.duration`` seconds of the fleet and measure it."""
    t0 = time.perf_counter()
    gc.collect()
    rss0 = _rss_kib()
    fleet = _Fleet(sc)
    gc.disable()  # millions of small objects that live until the end: no cycles to find
    try:
        fleet.build()
        fleet.sim.run(until=sc.duration, on_tick=progress)
    finally:
        gc.enable()
    mem = (_rss_kib() - rss0) / max(1, len(fleet.nodes))
    return fleet.result(time.perf_counter() - t0, mem)


__all__ = ["MembershipResult", "MembershipScenario", "run"]
