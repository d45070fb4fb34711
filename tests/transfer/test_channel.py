"""Deterministic tests of the channel state machine (no sockets, virtual clock)."""

from __future__ import annotations

import pytest

from blobmesh.errors import BadPeerDataError, ProtocolError
from blobmesh.store import Bitfield
from blobmesh.transfer.channel import Channel, EventCode, Status, Voucher
from blobmesh.transfer.messages import (
    Ack,
    Complete,
    Data,
    Layer,
    Request,
    Selector,
    decode,
    encode,
)
from tests.transfer.sim import PIECE, Sim


def st(ch: Channel | None) -> Status:
    """The status, read through a call so mypy does not narrow it between transitions."""
    assert ch is not None
    return ch.status


@pytest.mark.parametrize("pull", [True, False])
def test_happy_path(pull: bool) -> None:
    sim = Sim(pull)
    sim.open()
    assert st(sim.init) is Status.REQUESTED
    sim.accept_request()
    sim.pump()
    assert st(sim.init) is Status.COMPLETED
    assert st(sim.sender) is Status.COMPLETED
    assert b"".join(sim.store[i] for i in range(10)) == sim.data
    assert sim.sent_pieces == list(range(10))
    st_s, st_r = sim.sender.snapshot(), sim.receiver.snapshot()
    assert st_s.sent == st_r.received == len(sim.data)
    assert st_s.total == len(sim.data)
    codes = sim.codes()
    assert codes.count(EventCode.COMPLETE) == 2
    assert EventCode.FINISH_TRANSFER in codes
    assert [s.name for s in sim.init.rec.stages][:2] == ["Requested", "Ongoing"]


def test_window_limits_in_flight() -> None:
    sim = Sim(True, window=3 * PIECE)
    sim.open()
    sim.accept_request()
    sender = sim.sender
    for want in range(3):
        i = sender.next_piece(sim.window)
        assert i == want
        sender.piece_queued(i)
    assert sender.next_piece(sim.window) is None
    sender.receive(Ack([0]))
    assert sender.next_piece(sim.window) == 3


def test_restart_sends_only_missing_and_counts_once() -> None:
    sim = Sim(True, window=2 * PIECE)
    sim.open()
    sim.accept_request()
    for _ in range(3):  # send a few pieces, deliver them, then cut the link
        i = sim.sender.next_piece(sim.window)
        assert i is not None
        sim.send_piece(i)
        while sim.to_init or sim.to_resp:
            if sim.to_init:
                sim.apply(sim.init, sim.init.receive(sim.to_init.popleft()))
            if sim.to_resp:
                assert sim.resp is not None
                sim.apply(sim.resp, sim.resp.receive(sim.to_resp.popleft()))
    i = sim.sender.next_piece(sim.window)
    assert i is not None
    sim.send_piece(i)  # in flight when the link dies: lost
    sim.to_init.clear()
    sim.apply(sim.init, sim.init.disconnected("reset"))
    assert sim.resp is not None
    sim.apply(sim.resp, sim.resp.disconnected("reset"))
    assert st(sim.init) is Status.STALLED and st(sim.resp) is Status.STALLED
    before = list(sim.sent_pieces)
    verified_before = sim.receiver.snapshot().received
    sim.init.note_restart_attempt()
    sim.open(sim.have())
    req = sim.to_resp[0]
    assert isinstance(req, Request) and req.restart and req.have == sim.have().to_bytes()
    sim.accept_request()
    sim.pump()
    assert st(sim.init) is Status.COMPLETED
    resent = sim.sent_pieces[len(before):]
    assert sorted(resent) == [p for p in range(10) if p not in (0, 1, 2)]
    assert verified_before == 3 * PIECE
    assert sim.receiver.snapshot().received == len(sim.data)
    assert sim.sender.snapshot().sent == len(sim.data)
    assert sim.sender.rec.restarts == 1 and EventCode.RESTART in sim.codes()


def test_idle_restarts_are_counted() -> None:
    sim = Sim(True)
    for _ in range(3):
        sim.init.note_restart_attempt()
    assert sim.init.rec.idle_restarts == 2


def test_pause_both_sides() -> None:
    sim = Sim(True)
    sim.open()
    sim.accept_request()
    sim.apply(sim.init, sim.init.pause())
    sim.pump()
    assert st(sim.init) is Status.INITIATOR_PAUSED
    assert st(sim.sender) is Status.INITIATOR_PAUSED
    assert sim.sent_pieces == []
    assert sim.resp is not None
    sim.apply(sim.resp, sim.resp.pause())
    sim.pump()
    assert st(sim.init) is Status.BOTH_PAUSED and st(sim.resp) is Status.BOTH_PAUSED
    sim.apply(sim.init, sim.init.resume())
    sim.pump()
    assert st(sim.init) is Status.RESPONDER_PAUSED and sim.sent_pieces == []
    sim.apply(sim.resp, sim.resp.resume())
    sim.pump()
    assert st(sim.init) is Status.COMPLETED
    codes = sim.codes()
    for c in (EventCode.PAUSE_INITIATOR, EventCode.RESUME_INITIATOR,
              EventCode.PAUSE_RESPONDER, EventCode.RESUME_RESPONDER):
        assert c in codes


def test_paused_channel_restarts_paused() -> None:
    sim = Sim(True)
    sim.open()
    sim.accept_request()
    sim.apply(sim.init, sim.init.pause())
    sim.pump()
    sim.apply(sim.init, sim.init.disconnected("gone"))
    assert sim.resp is not None
    sim.apply(sim.resp, sim.resp.disconnected("gone"))
    sim.to_resp.clear()
    sim.open(sim.have())
    sim.accept_request()
    sim.pump()
    assert st(sim.init) is Status.INITIATOR_PAUSED and sim.sent_pieces == []
    sim.apply(sim.init, sim.init.resume())
    sim.pump()
    assert st(sim.init) is Status.COMPLETED


def test_stall_detection_uses_the_clock() -> None:
    sim = Sim(True)
    sim.open()
    sim.clock.now += 5
    assert not sim.init.tick(10).events
    sim.clock.now += 6
    step = sim.init.tick(10)
    assert [e.code for e in step.events] == [EventCode.REQUEST_TIMED_OUT]
    assert st(sim.init) is Status.STALLED
    sim2 = Sim(True)
    sim2.open()
    sim2.accept_request()
    sim2.apply(sim2.init, sim2.init.pause())
    sim2.pump()
    sim2.clock.now += 100
    assert not sim2.init.tick(10).events  # a paused channel is not stalled
    sim2.apply(sim2.init, sim2.init.resume())
    sim2.clock.now += 11
    sim2.connected = False
    assert sim2.init.tick(10).events[0].code is EventCode.STALLED


def test_revalidation_pause_and_voucher() -> None:
    sim = Sim(True)
    sim.open()
    sim.accept_request()
    assert sim.resp is not None
    sim.apply(sim.resp, sim.resp.demand_voucher(Voucher("quota", b"pay")))
    sim.pump()
    assert st(sim.init) is Status.RESPONDER_PAUSED
    assert sim.init.snapshot().last_voucher_result == Voucher("quota", b"pay")
    n = len(sim.sent_pieces)
    sim.apply(sim.init, sim.init.send_voucher(Voucher("v", b"2")))
    step = sim.resp.receive(sim.to_resp.popleft())
    assert step.revalidate == Voucher("v", b"2")
    sim.apply(sim.resp, step)
    sim.apply(sim.resp, sim.resp.voucher_verdict(True))
    sim.pump()
    assert st(sim.init) is Status.COMPLETED and len(sim.sent_pieces) > n
    assert sim.resp.snapshot().vouchers == (Voucher("v", b"1"), Voucher("v", b"2"))


def test_final_voucher_before_completion() -> None:
    sim = Sim(False)
    sim.open()
    sim.accept_request()
    assert sim.resp is not None
    resp = sim.resp

    def finish_with_demand(step: object) -> None:
        raise AssertionError

    # intercept the responder's completion: demand a final voucher instead
    orig = sim.apply

    def apply(ch: Channel, step: object) -> None:
        from blobmesh.transfer.channel import Step

        assert isinstance(step, Step)
        if ch is resp and step.finished:
            step.finished = False
            orig(ch, step)
            orig(ch, resp.demand_voucher(Voucher("final", b""), final=True))
            return
        orig(ch, step)

    sim.apply = apply  # type: ignore[method-assign]
    sim.pump()
    assert st(resp) is Status.FINALIZING
    assert st(sim.init) is Status.RESPONDER_FINALIZING_TRANSFER_FINISHED
    sim.apply(sim.init, sim.init.send_voucher(Voucher("v", b"final")))
    sim.apply(resp, resp.receive(sim.to_resp.popleft()))
    sim.apply(resp, resp.voucher_verdict(True))
    sim.pump()
    assert st(resp) is Status.COMPLETED and st(sim.init) is Status.COMPLETED
    assert EventCode.RESPONDER_BEGINS_FINALIZATION in sim.codes()


def test_reject_fails_initiator() -> None:
    sim = Sim(True)
    sim.open()
    req = sim.to_resp.popleft()
    assert isinstance(req, Request)
    resp = Channel.respond(req, sim.chid.initiator, sim.chid.responder, sim.clock)
    sim.resp = resp
    sim.apply(resp, resp.reject("no deal", Voucher("why", b"x")))
    sim.pump()
    assert st(sim.init) is Status.FAILED and sim.init.rec.error_kind == "rejected"
    assert "no deal" in sim.init.rec.message
    assert sim.init.snapshot().last_voucher_result == Voucher("why", b"x")


def test_cancel_race_and_dead_cancel() -> None:
    sim = Sim(True)
    sim.open()
    sim.accept_request()
    assert sim.resp is not None
    sim.apply(sim.init, sim.init.cancel("a"))
    sim.apply(sim.resp, sim.resp.cancel("b"))
    sim.pump()
    assert st(sim.init) is Status.CANCELLED and st(sim.resp) is Status.CANCELLED
    dead = Sim(True)
    dead.open()
    dead.apply(dead.init, dead.init.disconnected("gone"))
    dead.apply(dead.init, dead.init.cancel())
    assert st(dead.init) is Status.CANCELLED
    assert not dead.init.cancel().send  # cancelling twice is a no-op


def test_corrupt_piece_fails_with_peer() -> None:
    sim = Sim(True, corrupt={3})
    sim.open()
    sim.accept_request()
    sim.pump()
    assert st(sim.init) is Status.FAILED and sim.init.rec.error_kind == "bad_data"
    assert sim.init.rec.bad_peer == str(sim.chid.responder)
    assert 3 not in sim.store
    assert st(sim.sender) is Status.FAILED


def test_bad_layer_is_bad_peer_data() -> None:
    sim = Sim(False)
    sim.open()
    req = sim.to_resp.popleft()
    assert isinstance(req, Request) and req.layer is not None
    bad = Layer(req.layer.size, req.layer.piece_size, bytes(32) + req.layer.hashes[32:])
    forged = Request(req.transfer_id, False, req.blob_id, "v", b"", layer=bad)
    with pytest.raises(BadPeerDataError):
        Channel.respond(forged, sim.chid.initiator, sim.chid.responder, sim.clock)


def test_protocol_violations() -> None:
    sim = Sim(True)
    sim.open()
    sim.accept_request()
    assert sim.resp is not None
    with pytest.raises(ProtocolError):
        sim.resp.receive(Data(0, 0, memoryview(b"x")))  # the sender gets no data
    with pytest.raises(ProtocolError):
        sim.init.receive(Complete())  # nothing moved yet
    sim.pump()
    with pytest.raises(ProtocolError):
        Sim(True).init.receive(Data(0, 0, memoryview(b"x")))  # data before any response
    s = Sim(True)
    s.open()
    s.accept_request()
    i = s.sender.next_piece(s.window)
    assert i is not None
    with pytest.raises(ProtocolError):
        s.init.receive(Data(99, 0, memoryview(b"x")))
    with pytest.raises(ProtocolError):
        s.init.receive(Data(0, 5, memoryview(b"x")))  # a piece must start at offset 0
    with pytest.raises(ProtocolError):
        decode(b"\x81\xa1t\xa4nope")
    assert isinstance(decode(encode(Ack([1, 2]))), Ack)


def test_selectors() -> None:
    assert Selector().resolve(10 * PIECE, PIECE) == list(range(10))
    assert Selector.byte_ranges((PIECE - 1, 2), (5 * PIECE, 1)).resolve(10 * PIECE, PIECE) \
        == [0, 1, 5]
    assert Selector.piece_set({7, 2}).resolve(10 * PIECE, PIECE) == [2, 7]
    with pytest.raises(ProtocolError):
        Selector.piece_set([10]).resolve(10 * PIECE, PIECE)
    with pytest.raises(ProtocolError):
        Selector.byte_ranges((9 * PIECE, PIECE + 1)).resolve(10 * PIECE, PIECE)
    sim = Sim(True, selector=Selector.piece_set([1, 4]))
    sim.open()
    sim.accept_request()
    sim.pump()
    assert st(sim.init) is Status.COMPLETED and sorted(sim.store) == [1, 4]
    assert sim.init.snapshot().received == 2 * PIECE


def test_push_receiver_with_partial_only_gets_missing() -> None:
    sim = Sim(False)
    sim.store = {i: b"" for i in (0, 1, 2)}  # the receiver already holds these pieces
    sim.open()
    sim.accept_request()
    sim.pump()
    assert st(sim.init) is Status.COMPLETED
    assert sim.sent_pieces == list(range(3, 10))
    bf = Bitfield(10)
    bf.update(range(10))
    assert sim.have() == bf


def test_restart_of_a_pull_whose_layer_never_arrived() -> None:
    sim = Sim(True)
    sim.store = {0: b"", 1: b""}  # the receiver's store already holds these (an earlier run)
    sim.open(sim.have())  # the channel itself knows no layer yet
    sim.accept_request()
    sim.pump()
    assert st(sim.init) is Status.COMPLETED
    assert sim.sent_pieces == list(range(2, 10))


def test_unknown_version_is_refused() -> None:
    sim = Sim(True)
    sim.open()
    req = sim.to_resp.popleft()
    assert isinstance(req, Request)
    future = Request(req.transfer_id, True, req.blob_id, "v", b"", version=2)
    with pytest.raises(ProtocolError, match="version 2"):
        Channel.respond(future, sim.chid.initiator, sim.chid.responder, sim.clock)


def test_restart_after_the_initiator_missed_complete() -> None:
    sim = Sim(True)
    sim.open()
    sim.accept_request()
    sim.pump()
    assert sim.resp is not None and st(sim.resp) is Status.COMPLETED
    # pretend the initiator crashed before it read ``complete``
    sim.init.rec.base = Status.STALLED.value
    sim.init.remaining = 0
    sim.open(sim.have())
    sim.accept_request()
    sim.pump()
    assert st(sim.init) is Status.COMPLETED and st(sim.resp) is Status.COMPLETED
    assert sim.sent_pieces == list(range(10))  # nothing sent twice
    cancelled = Sim(True)
    cancelled.open()
    cancelled.accept_request()
    cancelled.apply(cancelled.init, cancelled.init.cancel())
    cancelled.pump()
    with pytest.raises(ProtocolError, match="Cancelled"):
        assert cancelled.resp is not None
        cancelled.resp.restarted(Request(7, True, cancelled.blob_id.digest, "v", b"",
                                         restart=True))
