"""A deterministic two-channel simulation: no sockets, no disk, a virtual clock."""

from __future__ import annotations

import os
from collections import deque

from blobmesh.hashing import PieceLayer, hash_stream
from blobmesh.store import Bitfield
from blobmesh.transfer.channel import Channel, ChannelId, Event, EventCode, Step, Voucher
from blobmesh.transfer.messages import Data, Message, Request, Selector
from blobmesh.transport.identity import NodeId

PIECE = 16 * 1024
A = NodeId(b"\x01" * 32)
B = NodeId(b"\x02" * 32)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sim:
    """Initiator ``A`` and responder ``B`` joined by two in-order message queues."""

    def __init__(self, pull: bool, pieces: int = 10, selector: Selector | None = None,
                 window: int = 4 * PIECE, corrupt: set[int] | None = None) -> None:
        self.clock = Clock()
        self.data = os.urandom(pieces * PIECE - 100)
        self.blob_id, self.layer = hash_stream([self.data], PIECE)
        self.pull = pull
        self.window = window
        self.corrupt = corrupt or set()
        self.selector = selector or Selector()
        self.chid = ChannelId(A, B, 7)
        self.init = Channel.initiate(self.chid, pull, self.blob_id, self.selector,
                                     Voucher("v", b"1"), self.clock,
                                     None if pull else self.layer)
        self.resp: Channel | None = None
        self.to_resp: deque[Message] = deque()
        self.to_init: deque[Message] = deque()
        self.events: list[Event] = []
        self.store: dict[int, bytes] = {}
        """The receiver's verified pieces (its "disk")."""
        self.sent_pieces: list[int] = []
        self.connected = True

    @property
    def sender(self) -> Channel:
        assert self.resp is not None
        return self.resp if self.pull else self.init

    @property
    def receiver(self) -> Channel:
        assert self.resp is not None
        return self.init if self.pull else self.resp

    def have(self) -> Bitfield:
        bf = Bitfield(len(self.layer))
        bf.update(self.store)
        return bf

    def apply(self, ch: Channel, step: Step) -> None:
        self.events += step.events
        if self.connected:
            (self.to_resp if ch is self.init else self.to_init).extend(step.send)
        for index, data in step.pieces:
            if self.layer.check_piece(index, data):
                self.store[index] = bytes(data)
                self.apply(ch, ch.pieces_verified([index]))
            else:
                self.apply(ch, ch.bad_data(index, "hash mismatch"))
        if step.finished:
            self.apply(ch, ch.complete())

    def open(self, have: Bitfield | None = None) -> None:
        self.apply(self.init, self.init.request(have))

    def accept_request(self, paused: bool = False, result: Voucher | None = None) -> None:
        req = self.to_resp.popleft()
        assert isinstance(req, Request)
        if self.resp is None:
            self.resp = Channel.respond(req, A, B, self.clock)
        else:
            self.resp.restarted(req)
        have = Bitfield(len(self.layer), req.have) if req.have is not None else None
        if not self.pull:
            have = self.have()
        self.apply(self.resp, self.resp.accept(self.layer, have, result, paused))

    def pump(self, max_rounds: int = 10_000) -> None:
        """Deliver messages and let the sender send until nothing moves."""
        for _ in range(max_rounds):
            moved = False
            while self.connected and (self.to_resp or self.to_init):
                moved = True
                if self.to_resp:
                    assert self.resp is not None
                    self.apply(self.resp, self.resp.receive(self.to_resp.popleft()))
                if self.to_init:
                    self.apply(self.init, self.init.receive(self.to_init.popleft()))
            if self.resp is not None and self.connected:
                i = self.sender.next_piece(self.window)
                if i is not None:
                    moved = True
                    self.send_piece(i)
            if not moved:
                return
        raise AssertionError("simulation did not settle")

    def send_piece(self, i: int) -> None:
        self.sent_pieces.append(i)
        self.apply(self.sender, self.sender.piece_queued(i))
        off, length = self.layer.piece_range(i)
        data = self.data[off : off + length]
        if i in self.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        queue = self.to_init if self.pull else self.to_resp
        half = length // 2
        queue.append(Data(i, 0, memoryview(data)[:half]))
        queue.append(Data(i, half, memoryview(data)[half:]))

    def codes(self) -> list[EventCode]:
        return [e.code for e in self.events]


def layer_of(data: bytes) -> PieceLayer:
    return hash_stream([data], PIECE)[1]
