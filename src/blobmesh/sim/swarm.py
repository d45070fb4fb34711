"""Simulated nodes running the real swarm schedulers over a :class:`FlowNetwork`.

Each :class:`SimNode` holds what a real node holds for one blob — a
:class:`~blobmesh.distribution.scheduler.DownloadScheduler` while it downloads and an
:class:`~blobmesh.distribution.scheduler.UploadScheduler` always — and executes their actions
the way ``distribution/swarm.py`` does, only over virtual time: control messages arrive after
the pair's latency, pieces are flows on the sender's and receiver's links, then one latency.
Every connection sends its pieces one after the other (one stream), so a node's link is shared
by its connections.

What it does not model: message encoding (the protocol session's checks are assumed to pass),
disk and CPU time of hashing (a CPU-starved node's *timers* fire late), transport flow-control
windows and slow start, and the space (peer lists are complete and current).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from blobmesh.distribution.progress import (
    FINAL_NOTES_PER_S,
    PROGRESS_INTERVAL,
    SOURCE_NOTES_PER_S,
    NoteSchedule,
)
from blobmesh.distribution.scheduler import (
    UPLOAD_SLOTS,
    Announce,
    Ban,
    Cancel,
    Close,
    Complete,
    Dial,
    DownloadAction,
    DownloadPolicy,
    DownloadScheduler,
    Failed,
    Flush,
    Refuse,
    Request,
    RequestLayer,
    Serve,
    StateChanged,
    UploadScheduler,
    max_unacked,
)
from blobmesh.sim.engine import Simulator, Timer
from blobmesh.sim.network import Flow, FlowNetwork
from blobmesh.types import Bitfield

# bytes on the wire of each control message (msgpack + the transport's frame and record)
CTRL_BYTES = 40
HELLO_BYTES = 80
NOTE_BYTES = 90  # a progress notification to the source
SOURCE = 0


@dataclass(slots=True)
class Swarmwide:
    """What every node of one run shares."""

    pieces: int
    piece_size: int
    size: int
    policy: DownloadPolicy
    max_connections: int = 64
    upload_slots: int | None = UPLOAD_SLOTS  # see UploadScheduler
    max_upload_slots: int | None = None  # ... adapting up to this many (None: fixed)
    # the service's progress notes to the source (see ``NoteSchedule``)
    progress_interval: float = PROGRESS_INTERVAL
    source_notes_per_s: float = SOURCE_NOTES_PER_S
    final_notes_per_s: float = FINAL_NOTES_PER_S
    retry_backoff: float = 1.0  # a failed job is retried after this (doubling, to 15 s)
    priority: int = 1


@dataclass(slots=True)
class Traffic:
    """Control messages and bytes a node sent and received."""

    msgs_in: int = 0
    msgs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    notes_in: int = 0  # progress notifications (only the source gets them)
    dials_in: int = 0
    # messages received, by kind (``KINDS``; notes by cause: ``note-first`` … ``note-final``)
    kinds_in: dict[str, int] = field(default_factory=dict)


# the kinds of control messages :attr:`Traffic.kinds_in` counts
KINDS = ("hello", "hello-back", "have", "request", "cancel", "refusal", "layer-request",
         "layer", "note-start", "note-first", "note-progress", "note-state", "note-final")


class End:
    """One side of a connection: ``node`` talks to ``peer``; ``have`` is the peer's bitfield
    as this side knows it."""

    __slots__ = ("attached", "closed", "flow", "have", "latency", "node", "other", "peer",
                 "queue")

    def __init__(self, node: SimNode, peer: SimNode, have: Bitfield) -> None:
        self.node = node
        self.peer = peer
        self.have = have
        self.other: End | None = None
        self.queue: deque[int] = deque()  # pieces queued to send, the first one in flight
        self.flow: Flow | None = None
        self.closed = False
        self.attached = False  # the hello exchange finished on this side
        self.latency = node.spec.latency + peer.spec.latency  # one way, either direction


@dataclass(slots=True)
class NodeSpec:
    """One node's links and faults."""

    up: float  # bytes/s
    down: float
    latency: float  # one way to the switch, seconds
    join_at: float = 0.0
    liar: bool = False  # serves corrupt pieces
    timer_lag: float = 0.0  # a CPU-starved node's timers fire this late
    crash_at: float | None = None
    restart_after: float = 5.0


@dataclass(slots=True)
class Outcome:
    done_at: float | None = None
    bans: int = 0
    failures: int = 0
    crashes: int = 0


class SimNode:
    """One node of the simulated fleet (see the module doc)."""

    def __init__(self, world: World, index: int, spec: NodeSpec, seed: bool) -> None:
        self.world = world
        self.index = index
        self.spec = spec
        self.net_id = world.net.add_node(spec.up, spec.down)
        self.alive = False
        self.have = Bitfield.full(world.wide.pieces) if seed else Bitfield(world.wide.pieces)
        self.flushed = self.have.copy()
        self.has_layer = seed
        self.complete = seed
        self.sched: DownloadScheduler[End, int] | None = None
        self.upload = UploadScheduler[End, int, int](
            slots=world.wide.upload_slots, max_slots=world.wide.max_upload_slots)
        self.ends: dict[End, None] = {}
        self.banned: set[int] = set()
        self.traffic = Traffic()
        self.outcome = Outcome(done_at=0.0 if seed else None)
        self.active = False  # it knows about the distribution
        self._timer: Timer | None = None
        self.notes: NoteSchedule | None = None  # the service's, from the distribution's start
        self._noted_once = False
        self._stalled = False
        self._backoff = world.wide.retry_backoff

    def __lt__(self, other: SimNode) -> bool:
        return self.index < other.index

    # --- life cycle ------------------------------------------------------------------------

    def join(self) -> None:
        """The node learns of the distribution (its request op arrived)."""
        self.alive = True
        self.active = True
        if not self.complete:
            wide, world = self.world.wide, self.world
            self.notes = NoteSchedule(len(world.nodes) - 1, world.sim.now,
                                      wide.progress_interval, wide.source_notes_per_s,
                                      wide.final_notes_per_s, rng=world.node_rng(self))
            if not self.notes.stretched:  # the service's "transferring" report
                world.note(self, "note-start")
            self._start_job()

    def crash(self) -> None:
        """Power off: connections drop, unflushed pieces are lost."""
        if not self.alive:
            return
        self.alive = False
        self.outcome.crashes += 1
        for end in list(self.ends):
            self.world.close(end, "peer crashed", notify_after=self.world.detect_crash)
        self.sched = None
        self.upload = UploadScheduler[End, int, int](
            slots=self.world.wide.upload_slots, max_slots=self.world.wide.max_upload_slots)
        self.have = self.flushed.copy()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.world.sim.after(self.spec.restart_after, self.restart)

    def restart(self) -> None:
        self.alive = True
        if self.active and not self.complete:
            self._start_job()

    def _start_job(self) -> None:
        world = self.world
        wide = world.wide
        self.sched = DownloadScheduler[End, int](
            wide.pieces, self.index, world.candidates(self), world.sim.now, wide.policy,
            free_connections=lambda: wide.max_connections - len(self.ends),
            banned=self.banned, rng=world.node_rng(self))
        if self.has_layer:  # a restart: the partial blob kept its layer and flushed pieces
            self.execute(self.sched.start(self.have, world.sim.now))
        else:
            self.execute(self.sched.handle_timer(world.sim.now))

    # --- executing the download scheduler --------------------------------------------------

    def execute(self, actions: Iterable[DownloadAction[int, End]]) -> None:
        world = self.world
        for a in actions:
            if isinstance(a, Request):
                world.ctrl(a.conn, "request", CTRL_BYTES, world.on_request, a.index)
            elif isinstance(a, Announce):
                # (each index past the first: about 3 more bytes of msgpack)
                nbytes = CTRL_BYTES + 3 * (len(a.indices) - 1 if a.indices else 0)
                world.ctrl(a.conn, "have", nbytes, world.on_have, a.indices)
            elif isinstance(a, Cancel):
                world.ctrl(a.conn, "cancel", CTRL_BYTES, world.on_cancel, a.index)
            elif isinstance(a, Dial):
                world.dial(self, world.nodes[a.peer])
            elif isinstance(a, RequestLayer):
                world.ctrl(a.conn, "layer-request", CTRL_BYTES, world.on_layer_request)
            elif isinstance(a, Close):
                world.close(a.conn, a.reason)
            elif isinstance(a, Ban):
                self.outcome.bans += 1
                for end in list(self.ends):
                    if end.peer.index == a.peer:
                        world.close(end, f"banned: {a.why}")
            elif isinstance(a, Flush):
                self.flushed = self.have.copy()
            elif isinstance(a, Complete):
                self._completed()
            elif isinstance(a, StateChanged):
                self._stalled = a.stalled
                self._progress()  # (a state change: at once in a small scope, not an op)
            elif isinstance(a, Failed):
                self._failed()
        self._arm()

    def _arm(self) -> None:
        """Keep one timer at the scheduler's ``get_timer()`` (late when CPU-starved)."""
        sched = self.sched
        when = sched.get_timer() if sched is not None else None
        if when is None:
            return
        when += self.spec.timer_lag
        timer = self._timer
        if timer is not None:
            if timer.fn is not None and timer.when <= when:  # (active, and early enough)
                return
            timer.cancel()
        self._timer = self.world.sim.at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.sched is not None and self.alive:
            self.execute(self.sched.handle_timer(self.world.sim.now))

    def _completed(self) -> None:
        world = self.world
        self.complete = True
        self.flushed = self.have.copy()
        self.outcome.done_at = world.sim.now
        self._progress()  # the last byte (the job reports it before the service's final note)
        # (a final state is a note to the source, not an op)
        world.note(self, "note-final", self.notes.final_delay() if self.notes else 0.0)
        sched, self.sched = self.sched, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        world.on_complete(self)
        for end in list(sched.conns() if sched is not None else ()):
            self.upload.set_downloading(end, False)
            if end.have.is_complete():
                world.close(end, "done")  # keep seeding to peers that still download

    def _failed(self) -> None:
        self.outcome.failures += 1  # (retrying is no final state: a note, no op)
        if self.notes is not None and not self.notes.stretched:
            self.world.note(self, "note-state")
        self.sched = None
        for end in list(self.ends):
            self.world.close(end, "job failed")
        self.world.sim.after(self._backoff, self._retry)
        self._backoff = min(self._backoff * 2, 15.0)

    def _retry(self) -> None:
        if self.alive and not self.complete and self.sched is None:
            self._start_job()

    def _progress(self) -> None:
        """The job reports progress to the service, which notes it to the source when its
        :class:`NoteSchedule` says."""
        notes = self.notes
        if notes is not None and notes.progress(self._stalled, self.have.is_complete(),
                                                self.world.sim.now):
            self.world.note(self, "note-progress" if self._noted_once else "note-first")
            self._noted_once = True

    # --- executing the upload scheduler ----------------------------------------------------

    def pump(self) -> None:
        """Start every upload the scheduler lets go now."""
        world = self.world
        while (a := self.upload.next()) is not None:
            if isinstance(a, Refuse):
                world.ctrl(a.conn, "refusal", CTRL_BYTES, world.on_refused, a.index, a.reason)
            elif isinstance(a, Serve):
                end = a.conn
                if a.index not in self.have:
                    self.upload.read_failed(end)
                    world.ctrl(end, "refusal", CTRL_BYTES, world.on_refused, a.index,
                               "not here")
                    continue
                end.queue.append(a.index)
                if end.flow is None:
                    world.send_next(end)


Candidates = Callable[[SimNode], Callable[[], Sequence[int]]]


class World:
    """The fleet: nodes, the network between them, and message delivery."""

    def __init__(self, sim: Simulator, wide: Swarmwide, specs: list[NodeSpec],
                 candidates: Candidates, detect_crash: float = 3.0) -> None:
        self.sim = sim
        self.wide = wide
        self.net = FlowNetwork(sim)
        self.detect_crash = detect_crash
        self._candidates = candidates
        self.nodes = [SimNode(self, i, spec, seed=i == SOURCE) for i, spec in enumerate(specs)]
        # dist/* ops published, each gossiped to every node: the request, and the source's
        # summary once every target is done (targets publish none)
        self.dist_ops = 1
        self.late_notes: list[tuple[float, str]] = []  # (arrival at the source, kind)
        self.completed = 0
        self.honest_targets = sum(1 for n in self.nodes[1:] if not n.spec.liar)
        self.on_all_done: Callable[[], None] | None = None

    def node_rng(self, node: SimNode) -> random.Random:
        return random.Random(self.sim.rng.getrandbits(64))

    def candidates(self, node: SimNode) -> Callable[[], Sequence[int]]:
        return self._candidates(node)

    def latency(self, a: SimNode, b: SimNode) -> float:
        return a.spec.latency + b.spec.latency

    # --- control messages ------------------------------------------------------------------

    def ctrl(self, end: End, kind: str, nbytes: int, handler: Callable[..., None],
             *args: object) -> None:
        """Send a small message of ``kind`` on ``end``; ``handler(receiving end, *args)`` on
        arrival."""
        other = end.other
        if end.closed or other is None:
            return
        traffic = end.node.traffic
        traffic.msgs_out += 1
        traffic.bytes_out += nbytes
        self.sim.post(end.latency, self._arrive, other, kind, nbytes, handler, args)

    def _arrive(self, end: End, kind: str, nbytes: int, handler: Callable[..., None],
                args: tuple[object, ...]) -> None:
        node = end.node
        if end.closed or not node.alive:
            return
        traffic = node.traffic
        traffic.msgs_in += 1
        traffic.bytes_in += nbytes
        kinds = traffic.kinds_in
        kinds[kind] = kinds.get(kind, 0) + 1
        handler(end, *args)

    def note(self, node: SimNode, kind: str, delay: float = 0.0) -> None:
        """A progress notification to the source (a space notify, not a swarm message),
        ``delay`` seconds from now (it changes nothing in the run: a note held back is only
        recorded, in :attr:`late_notes`, and counted by the result)."""
        node.traffic.msgs_out += 1
        node.traffic.bytes_out += NOTE_BYTES
        if delay > 0:
            self.late_notes.append((self.sim.now + delay, kind))
            return
        source = self.nodes[SOURCE].traffic
        source.msgs_in += 1
        source.notes_in += 1
        source.bytes_in += NOTE_BYTES
        source.kinds_in[kind] = source.kinds_in.get(kind, 0) + 1

    # --- connections -----------------------------------------------------------------------

    def dial(self, a: SimNode, b: SimNode) -> None:
        """``a`` dials ``b``: a handshake (one round trip), then the hellos (another)."""
        a.traffic.msgs_out += 1
        a.traffic.bytes_out += HELLO_BYTES
        self.sim.post(self.latency(a, b) * 1.5, self._accept, a, b, a.have.copy(),
                       a.has_layer)

    def _accept(self, a: SimNode, b: SimNode, a_have: Bitfield, a_layer: bool) -> None:
        """``a``'s hello reached ``b`` (with what ``a`` held when it sent it)."""
        rtt = self.latency(a, b)
        b.traffic.dials_in += 1
        b.traffic.msgs_in += 1
        b.traffic.bytes_in += HELLO_BYTES
        b.traffic.kinds_in["hello"] = b.traffic.kinds_in.get("hello", 0) + 1
        if not b.alive or not b.active or a.index in b.banned or \
                len(b.ends) >= self.wide.max_connections:
            self.sim.post(rtt, self._dial_ended, a, b)
            return
        eb = End(b, a, a_have)
        ea = End(a, b, b.have.copy())
        ea.other, eb.other = eb, ea
        b.ends[eb] = None
        b.upload.open(eb, 0, a.index, eb.have, self.sim.now,
                      max_unacked(self.wide.piece_size))
        eb.attached = True
        b.traffic.msgs_out += 1
        b.traffic.bytes_out += HELLO_BYTES
        self.sim.post(rtt, self._hello_back, ea)
        if b.sched is not None:
            b.upload.set_downloading(eb, True)
            b.execute(b.sched.attach(eb, a.index, eb.have, a_layer, False, self.sim.now))

    def _dial_ended(self, a: SimNode, b: SimNode) -> None:
        if a.alive and a.sched is not None:
            a.execute(a.sched.dial_ended(b.index, self.sim.now))

    def _hello_back(self, ea: End) -> None:
        a = ea.node
        if ea.closed or not a.alive:
            if not ea.closed:
                self.close(ea, "dialer gone")
            self._dial_ended(a, ea.peer)
            return
        a.traffic.msgs_in += 1
        a.traffic.bytes_in += HELLO_BYTES
        a.traffic.kinds_in["hello-back"] = a.traffic.kinds_in.get("hello-back", 0) + 1
        a.ends[ea] = None
        a.upload.open(ea, 0, ea.peer.index, ea.have, self.sim.now,
                      max_unacked(self.wide.piece_size))
        ea.attached = True
        if a.sched is None:
            self.close(ea, "not downloading any more")
            return
        a.upload.set_downloading(ea, True)
        now = self.sim.now
        a.execute(a.sched.dial_ended(ea.peer.index, now))
        if not ea.closed and a.sched is not None:
            a.execute(a.sched.attach(ea, ea.peer.index, ea.have, ea.peer.has_layer, True, now))

    def close(self, end: End, reason: str, notify_after: float | None = None) -> None:
        """Close both sides; the peer notices after one latency (or ``notify_after``)."""
        if end.closed:
            return
        for e in (end, end.other):
            if e is None or e.closed:
                continue
            e.closed = True
            if e.flow is not None:
                self.net.abort(e.flow)
                e.flow = None
            e.queue.clear()
        other = end.other
        self._drop(end)
        if other is not None:
            delay = notify_after if notify_after is not None else \
                self.latency(end.node, end.peer)
            self.sim.post(delay, self._drop, other)

    def _drop(self, end: End) -> None:
        node = end.node
        if end not in node.ends and not end.attached:
            return
        node.ends.pop(end, None)
        node.upload.close(end)
        end.attached = False
        if node.alive and node.sched is not None:
            node.execute(node.sched.detach(end, self.sim.now))
        if node.alive:
            node.pump()

    # --- swarm messages (handlers get the receiving end) -----------------------------------

    def on_request(self, end: End, index: int) -> None:
        node = end.node
        refused = node.upload.wanted(end, index, self.wide.priority, self.sim.now)
        if refused is not None:
            self.ctrl(end, "refusal", CTRL_BYTES, self.on_refused, refused.index,
                      refused.reason)
        node.pump()

    def on_cancel(self, end: End, index: int) -> None:
        node = end.node
        node.upload.cancelled(end, index)
        if node.upload.acked(end, index, self.sim.now):
            node.pump()

    def on_refused(self, end: End, index: int, reason: str) -> None:
        node = end.node
        if node.sched is not None:
            node.execute(node.sched.refused(end, index, reason, self.sim.now))

    def on_have(self, end: End, indices: list[int] | None) -> None:
        """``haves indices``, or ``have-all`` (None); like the session, only pieces this side
        did not know the peer holds go on."""
        node, have, now = end.node, end.have, self.sim.now
        new = [i for i in (range(have.size) if indices is None else indices) if i not in have]
        if new:
            have.update(new)
            acked = node.upload.acked
            freed = False
            for i in new:  # (every one of them)
                if acked(end, i, now):
                    freed = True
            if freed:
                node.pump()
        sched = node.sched
        if sched is not None:
            if not new:
                return
            if sched.picker is not None and sched.owns(end):
                # (the most common event) news of pieces on a connection the job keeps can
                # only make its timer later (a backoff over): with nothing to do, the timer
                # armed stays right, and re-arming it would cost the event a get_timer
                actions = sched.peer_has(end, new, now)
                if actions:
                    node.execute(actions)
            else:
                node.execute(sched.peer_has(end, new, now))
        elif node.complete and have.is_complete():
            self.close(end, "both complete")

    def on_layer_request(self, end: End) -> None:
        if end.node.has_layer:
            self.ctrl(end, "layer", CTRL_BYTES + 32 * self.wide.pieces, self.on_layer)

    def on_layer(self, end: End) -> None:
        node = end.node
        if node.sched is None:
            return
        now = self.sim.now
        node.execute(node.sched.layer_arrived(end, True, now))
        if node.sched is not None and node.sched.picker is None:
            node.has_layer = True
            node.execute(node.sched.start(node.have, now))

    # --- pieces ----------------------------------------------------------------------------

    def send_next(self, end: End) -> None:
        """Start the flow of the next queued piece of ``end``."""
        if end.closed or not end.queue or end.flow is not None:
            return
        node, peer = end.node, end.peer
        index = end.queue[0]
        end.flow = self.net.start(node.net_id, peer.net_id, self._piece_bytes(index),
                                  self._piece_sent, end, index)

    def _piece_bytes(self, index: int) -> int:
        wide = self.wide
        return min(wide.piece_size, wide.size - index * wide.piece_size) + CTRL_BYTES

    def _piece_sent(self, end: End, index: int) -> None:
        end.flow = None
        end.queue.popleft()
        node = end.node
        node.upload.sent(end, index, self.sim.now)
        if end.other is not None:
            self.sim.post(end.latency, self._piece_arrives, end.other, index, node.spec.liar)
        self.send_next(end)
        node.pump()

    def _piece_arrives(self, end: End, index: int, corrupt: bool) -> None:
        node = end.node
        if end.closed or not node.alive or node.sched is None:
            return
        sched = node.sched
        now = self.sim.now
        if not sched.piece_arrived(end, index, now):
            return
        if corrupt:
            node.execute(sched.piece_corrupt(end, index, now))
            return
        new = index not in node.have
        node.have.add(index)
        actions = sched.piece_written(end, index, new, now)
        node._progress()  # (the last piece's too: the real job reports every piece)
        node.execute(actions)

    def on_complete(self, node: SimNode) -> None:
        if not node.spec.liar:
            self.completed += 1
            if self.completed >= self.honest_targets:
                self.dist_ops += 1  # the summary
                if self.on_all_done is not None:
                    self.on_all_done()

