"""The manager over the in-memory network: validators, vouchers, pause, cancel, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from unittest import mock

import pytest

from blobmesh.errors import (
    BadPeerDataError,
    BlobNotFoundError,
    StoreFullError,
    TransferError,
    TransportError,
    VoucherRejectedError,
)
from blobmesh.hashing import BlobId
from blobmesh.store import LeaseId, PartialBlob
from blobmesh.transfer import (
    ChannelId,
    ChannelState,
    Decision,
    Event,
    EventCode,
    Selector,
    Status,
    Voucher,
)
from blobmesh.transfer.messages import Data, Message, Request
from blobmesh.transport.identity import NodeId
from tests.transfer.conftest import (
    PIECE,
    Pair,
    TapStream,
    add,
    corrupt,
    fast_config,
)
from tests.util import eventually as _eventually

T = 15  # seconds: generous bound on every wait, far above the expected runtime


async def eventually(cond: Callable[[], bool]) -> None:
    """Poll finely: some states under test (a pause, a stall) last only milliseconds."""
    await _eventually(cond, within=T, step=0.002)


class Picky:
    """Accepts only the voucher b"ok" (for pulls and pushes) and records what it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def validate_push(self, is_restart: bool, chid: ChannelId, sender: NodeId,
                      voucher: Voucher, blob_id: BlobId, selector: Selector) -> Decision:
        self.seen.append(("push", is_restart))
        return Decision.accept() if voucher.data == b"ok" else Decision.reject("bad voucher")

    def validate_pull(self, is_restart: bool, chid: ChannelId, receiver: NodeId,
                      voucher: Voucher, blob_id: BlobId, selector: Selector) -> Decision:
        self.seen.append(("pull", is_restart))
        if voucher.data != b"ok":
            return Decision.reject("bad voucher", Voucher("reason", b"pay first"))
        return Decision.accept(Voucher("receipt", b"r1"))


class Quota:
    """A revalidator demanding a new voucher every ``quota`` bytes, and a final one."""

    def __init__(self, quota: int, final: bool = False) -> None:
        self.quota = quota
        self.final = final
        self.used = 0
        self.final_paid = False
        self.revalidated: list[Voucher] = []

    def revalidate(self, chid: ChannelId, voucher: Voucher) -> Decision:
        self.revalidated.append(voucher)
        if voucher.data == b"bad":
            return Decision.reject("counterfeit")
        self.used = 0
        return Decision.accept(Voucher("receipt", voucher.data))

    def _count(self, nbytes: int) -> Decision | None:
        self.used += nbytes
        return Decision.pause(Voucher("invoice", b"more")) if self.used >= self.quota else None

    def on_pull_data_sent(self, chid: ChannelId, nbytes: int) -> Decision | None:
        return self._count(nbytes)

    def on_push_data_received(self, chid: ChannelId, nbytes: int) -> Decision | None:
        return self._count(nbytes)

    def on_complete(self, chid: ChannelId) -> Decision | None:
        if self.final:
            return Decision.pause(Voucher("final-invoice", b"settle"))
        return None


async def test_validator_accepts_and_rejects(pair: Pair, blob_bytes: bytes) -> None:
    a = await pair.peer(1, validator=False)
    b = await pair.peer(2)
    picky = Picky()
    a.mgr.register_voucher_type("deal", picky)
    bid = add(a.store, blob_bytes)
    bad = await b.mgr.open_pull(a.id, Voucher("deal", b"nope"), bid)
    with pytest.raises(VoucherRejectedError, match="bad voucher"):
        await asyncio.wait_for(b.mgr.wait(bad), T)
    assert b.mgr.channel_state(bad).last_voucher_result == Voucher("reason", b"pay first")
    unknown = await b.mgr.open_pull(a.id, Voucher("mystery"), bid)
    with pytest.raises(VoucherRejectedError, match="unknown voucher type"):
        await asyncio.wait_for(b.mgr.wait(unknown), T)
    good = await b.mgr.open_pull(a.id, Voucher("deal", b"ok"), bid)
    st = await asyncio.wait_for(b.mgr.wait(good), T)
    assert st.status is Status.COMPLETED and st.received == len(blob_bytes)
    assert st.last_voucher_result == Voucher("receipt", b"r1")
    assert picky.seen == [("pull", False)] * 2
    with pytest.raises(TransferError):
        a.mgr.register_voucher_type("deal", picky)


async def test_missing_blob_is_not_found(pair: Pair, blob_bytes: bytes) -> None:
    a = await pair.peer(1)
    b = await pair.peer(2)
    chid = await b.mgr.open_pull(a.id, Voucher("any"), BlobId(os.urandom(32)))
    with pytest.raises(BlobNotFoundError):
        await asyncio.wait_for(b.mgr.wait(chid), T)
    with pytest.raises(BlobNotFoundError):
        await b.mgr.open_push(a.id, Voucher("any"), BlobId(os.urandom(32)))


@pytest.mark.parametrize("pull", [True, False])
async def test_revalidation_pauses_until_new_voucher(pair: Pair, blob_bytes: bytes,
                                                     pull: bool) -> None:
    a = await pair.peer(1)
    b = await pair.peer(2)
    quota = Quota(4 * PIECE, final=True)
    responder = a if pull else b
    initiator = b if pull else a
    responder.mgr.register_revalidator("any", quota)
    bid = add(a.store, blob_bytes)
    statuses: list[Status] = []

    async def pay() -> None:
        async with contextlib.aclosing(initiator.mgr.events()) as events:
            async for event, state in events:
                if event.code in (EventCode.PAUSE_RESPONDER,
                                  EventCode.RESPONDER_BEGINS_FINALIZATION):
                    statuses.append(state.status)
                    await initiator.mgr.send_voucher(event.channel_id, Voucher("any", b"$"))
                if state.status in (Status.COMPLETED, Status.FAILED):
                    return

    payer = asyncio.create_task(pay())
    await asyncio.sleep(0)
    if pull:
        chid = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    else:
        chid = await a.mgr.open_push(b.id, Voucher("any"), bid)
    st = await asyncio.wait_for(initiator.mgr.wait(chid), T)
    await asyncio.wait_for(payer, T)
    assert st.status is Status.COMPLETED
    assert Status.RESPONDER_PAUSED in statuses
    assert statuses[-1] is Status.RESPONDER_FINALIZING_TRANSFER_FINISHED
    assert len(quota.revalidated) >= 3
    assert b.store.get_data(bid, LeaseId.new("t")) == blob_bytes


async def test_counterfeit_voucher_fails_both(pair: Pair, blob_bytes: bytes) -> None:
    a = await pair.peer(1)
    b = await pair.peer(2)
    a.mgr.register_revalidator("any", Quota(2 * PIECE))
    bid = add(a.store, blob_bytes)
    payments: set[asyncio.Task[None]] = set()

    def pay_badly(e: Event, s: ChannelState) -> None:
        if e.code is EventCode.PAUSE_RESPONDER:
            payments.add(asyncio.ensure_future(
                b.mgr.send_voucher(e.channel_id, Voucher("any", b"bad"))))

    unsubscribe = b.mgr.subscribe(pay_badly)
    chid = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    with pytest.raises(VoucherRejectedError, match="counterfeit"):
        await asyncio.wait_for(b.mgr.wait(chid), T)
    unsubscribe()
    await asyncio.gather(*payments)
    await eventually(lambda: a.mgr.channel_state(chid).status is Status.FAILED)


async def test_pause_resume_both_sides(pair: Pair, blob_bytes: bytes) -> None:
    a = await pair.peer(1)
    b = await pair.peer(2)
    bid = add(a.store, blob_bytes)
    seen: list[Status] = []
    b.mgr.subscribe(lambda e, s: seen.append(s.status))
    chid = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    await b.mgr.pause(chid)
    await asyncio.sleep(0.1)
    await a.mgr.pause(chid)
    await asyncio.sleep(0.1)
    assert b.mgr.channel_state(chid).status is Status.BOTH_PAUSED
    assert a.mgr.channel_state(chid).status is Status.BOTH_PAUSED
    sent = a.tap.data_sent
    await b.mgr.resume(chid)
    await asyncio.sleep(0.2)  # longer than the stall timeout would be if pauses counted
    assert a.tap.data_sent == sent
    assert b.mgr.channel_state(chid).status is Status.RESPONDER_PAUSED
    await a.mgr.resume(chid)
    st = await asyncio.wait_for(b.mgr.wait(chid), T)
    assert st.status is Status.COMPLETED
    assert {Status.INITIATOR_PAUSED, Status.BOTH_PAUSED, Status.RESPONDER_PAUSED} <= set(seen)
    assert b.mgr.in_progress_channels() == {}


async def test_both_cancel_at_once(pair: Pair, blob_bytes: bytes) -> None:
    a = await pair.peer(1, config=fast_config(window=PIECE))
    b = await pair.peer(2, config=fast_config(window=PIECE))
    bid = add(a.store, blob_bytes)
    chid = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    await eventually(lambda: a.tap.data_sent >= 2)
    await asyncio.gather(a.mgr.close(chid, "a quits"), b.mgr.close(chid, "b quits"))
    with pytest.raises(TransferError, match="cancelled"):
        await asyncio.wait_for(b.mgr.wait(chid), T)
    await asyncio.sleep(0.05)
    assert a.mgr.channel_state(chid).status is Status.CANCELLED
    # the responder still serves
    again = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    assert (await asyncio.wait_for(b.mgr.wait(again), T)).status is Status.COMPLETED


async def test_dead_channel_can_be_cancelled(pair: Pair, blob_bytes: bytes) -> None:
    a = await pair.peer(1)
    b = await pair.peer(2)
    bid = add(a.store, blob_bytes)
    await pair.stop(a)
    chid = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    await eventually(lambda: b.mgr.status(chid) is Status.STALLED)
    await b.mgr.close(chid)
    await b.mgr.close(chid)
    assert b.mgr.status(chid) is Status.CANCELLED
    assert b.mgr.status(ChannelId(b.id, a.id, 1)) is Status.CHANNEL_NOT_FOUND


async def test_unreachable_peer_gives_up_after_idle_restarts(pair: Pair,
                                                             blob_bytes: bytes) -> None:
    b = await pair.peer(2, config=fast_config(max_idle_restarts=3, restart_backoff=0.01))
    chid = await b.mgr.open_pull(NodeId(b"\x09" * 32), Voucher("any"), BlobId(bytes(32)))
    with pytest.raises(TransferError, match="gave up after 3 restarts"):
        await asyncio.wait_for(b.mgr.wait(chid), T)


async def test_reset_mid_transfer_restarts_and_resends_only_missing(
        pair: Pair, blob_bytes: bytes) -> None:
    # the restart comes from the reset; a stall timeout a loaded machine can reach would add
    # restarts of its own
    a = await pair.peer(1, fast_config(stall_timeout=10))
    b = await pair.peer(2, fast_config(stall_timeout=10))
    bid = add(a.store, blob_bytes)
    events: list[Event] = []
    b.mgr.subscribe(lambda e, s: events.append(e))

    async def reset_once(stream: TapStream, msg: Message) -> None:
        if isinstance(msg, Data) and a.tap.data_sent == 8:
            a.tap.hook = None
            stream.reset("cable pulled")
            raise TransportError("cable pulled")

    a.tap.hook = reset_once
    chid = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    st = await asyncio.wait_for(b.mgr.wait(chid), T)
    assert st.status is Status.COMPLETED and st.restarts == 1
    codes = [e.code for e in events]
    assert EventCode.DISCONNECTED in codes and EventCode.RESTART in codes
    pieces = a.tap.pieces_sent
    resent = len(pieces) - len(set(pieces))
    assert resent * PIECE <= fast_config().window
    assert st.received == len(blob_bytes)  # verified bytes counted once
    sender = a.mgr.channel_state(chid)
    assert sender.sent == len(blob_bytes) and sender.wire_bytes <= len(blob_bytes) + 4 * PIECE
    assert b.store.get_data(bid, LeaseId.new("t")) == blob_bytes


async def test_stall_becomes_stalled_then_restarts(pair: Pair, blob_bytes: bytes) -> None:
    a = await pair.peer(1)
    b = await pair.peer(2)
    bid = add(a.store, blob_bytes)
    frozen = asyncio.Event()

    async def freeze_once(stream: TapStream, msg: Message) -> None:
        if isinstance(msg, Data) and a.tap.data_sent == 5 and not frozen.is_set():
            frozen.set()
            await asyncio.Event().wait()  # a hung peer: no reset, no data, ever

    a.tap.hook = freeze_once
    statuses: list[Status] = []
    b.mgr.subscribe(lambda e, s: statuses.append(s.status))
    chid = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    st = await asyncio.wait_for(b.mgr.wait(chid), T)
    assert Status.STALLED in statuses
    assert st.status is Status.COMPLETED and st.restarts >= 1
    stages = [s.name for s in st.stages]
    assert "Stalled" in stages and stages[-1] == "Completed"


async def test_corrupt_sender_is_named(pair: Pair, blob_bytes: bytes) -> None:
    a = await pair.peer(1, config=fast_config(verify_reads=False))
    b = await pair.peer(2)
    bid = add(a.store, blob_bytes)
    corrupt(a.store.layout.data_path(bid), 5 * PIECE + 7, b"\xff\x00\xff")
    chid = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    with pytest.raises(BadPeerDataError) as err:
        await asyncio.wait_for(b.mgr.wait(chid), T)
    assert err.value.context["peer"] == a.id
    assert a.id.short() in str(err.value)
    assert not b.store.has(bid)
    assert 5 not in b.store.bitfield(bid)
    # a sender that verifies its reads refuses to send rot instead
    c = await pair.peer(3)
    cid = add(c.store, blob_bytes)
    corrupt(c.store.layout.data_path(cid), PIECE, b"\x00\xff")
    d = await pair.peer(4)
    chid2 = await d.mgr.open_pull(c.id, Voucher("any"), cid)
    with pytest.raises(TransferError, match="cannot read piece 1"):
        await asyncio.wait_for(d.mgr.wait(chid2), T)


async def test_disk_full_fails_cleanly_and_keeps_partial(pair: Pair,
                                                         blob_bytes: bytes) -> None:
    a = await pair.peer(1)
    b = await pair.peer(2)
    bid = add(a.store, blob_bytes)
    real = PartialBlob.write_piece
    calls = 0

    def write_piece(self: PartialBlob, index: int, data: bytes | memoryview) -> bool:
        nonlocal calls
        calls += 1
        if calls > 4:
            raise StoreFullError("disk full (simulated)")
        return real(self, index, data)

    with mock.patch.object(PartialBlob, "write_piece", write_piece):
        chid = await b.mgr.open_pull(a.id, Voucher("any"), bid)
        with pytest.raises(StoreFullError):
            await asyncio.wait_for(b.mgr.wait(chid), T)
    assert b.store.bitfield(bid).count() == 4
    # once there is room again a new pull resumes from the partial blob
    again = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    await asyncio.wait_for(b.mgr.wait(again), T)
    assert b.store.get_data(bid, LeaseId.new("t")) == blob_bytes


async def test_process_restart_resumes_monitoring(pair: Pair, blob_bytes: bytes) -> None:
    a = await pair.peer(1, config=fast_config(window=2 * PIECE, flush_bytes=PIECE))
    b = await pair.peer(2)
    bid = add(a.store, blob_bytes)
    chid = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    await eventually(lambda: b.mgr.channel_state(chid).received >= 4 * PIECE)
    await pair.stop(b)
    requests: list[Request] = []
    b2 = await pair.peer(2)
    orig = b2.tap.hook

    async def spy(stream: TapStream, msg: Message) -> None:
        if isinstance(msg, Request):
            requests.append(msg)
        if orig is not None:
            await orig(stream, msg)

    b2.tap.hook = spy
    st = await asyncio.wait_for(b2.mgr.wait(chid), T)
    assert st.status is Status.COMPLETED and st.received == len(blob_bytes)
    assert requests and requests[0].restart and requests[0].have is not None
    assert b2.store.get_data(bid, LeaseId.new("t")) == blob_bytes
    sent = a.mgr.channel_state(chid)
    assert sent.wire_bytes - len(blob_bytes) <= 2 * PIECE + PIECE


async def test_selector_and_partial_sender(pair: Pair, blob_bytes: bytes) -> None:
    a = await pair.peer(1)
    b = await pair.peer(2)
    c = await pair.peer(3)
    bid = add(a.store, blob_bytes)
    chid = await b.mgr.open_pull(a.id, Voucher("any"), bid, Selector.piece_set([1, 2, 5]))
    st = await asyncio.wait_for(b.mgr.wait(chid), T)
    assert st.received == 3 * PIECE and not b.store.has(bid)
    # b serves the pieces it has from its partial blob
    got = await c.mgr.open_pull(b.id, Voucher("any"), bid, Selector.byte_ranges((PIECE, 10)))
    assert (await asyncio.wait_for(c.mgr.wait(got), T)).received == PIECE
    missing = await c.mgr.open_pull(b.id, Voucher("any"), bid)
    with pytest.raises(BlobNotFoundError, match="not here"):
        await asyncio.wait_for(c.mgr.wait(missing), T)


async def test_events_and_state(pair: Pair, blob_bytes: bytes) -> None:
    a = await pair.peer(1)
    b = await pair.peer(2)
    bid = add(a.store, blob_bytes)
    got: list[tuple[Event, ChannelState]] = []
    unsubscribe = b.mgr.subscribe(lambda e, s: got.append((e, s)))
    chid = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    assert chid in b.mgr.in_progress_channels()
    await asyncio.wait_for(b.mgr.wait(chid), T)
    unsubscribe()
    codes = [e.code for e, _ in got]
    assert codes[0] is EventCode.OPEN and codes[-1] is EventCode.COMPLETE
    assert EventCode.ACCEPT in codes and EventCode.DATA_RECEIVED in codes
    received = [s.received for e, s in got if e.code is EventCode.DATA_RECEIVED]
    assert received == sorted(received) and received[-1] == len(blob_bytes)
    st = b.mgr.channel_state(chid)
    assert st.sender == a.id and st.recipient == b.id and st.other_peer == a.id
    assert [s.name for s in st.stages] == ["Requested", "Ongoing", "TransferFinished",
                                           "Completed"]
    assert st.stages[0].logs[0].message.startswith("Open")
    n = len(got)
    chid2 = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    await asyncio.wait_for(b.mgr.wait(chid2), T)
    assert len(got) == n


async def test_paused_channel_restarts_paused(pair: Pair, blob_bytes: bytes) -> None:
    a = await pair.peer(1, config=fast_config(window=PIECE))
    b = await pair.peer(2)
    bid = add(a.store, blob_bytes)
    chid = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    await b.mgr.pause(chid)
    await eventually(lambda: a.mgr.status(chid) is Status.INITIATOR_PAUSED)
    await b.mgr.restart(chid)
    await eventually(lambda: a.mgr.channel_state(chid).restarts == 1
                     and a.mgr.status(chid) is Status.INITIATOR_PAUSED)
    assert b.mgr.status(chid) is Status.INITIATOR_PAUSED
    await b.mgr.resume(chid)
    st = await asyncio.wait_for(b.mgr.wait(chid), T)
    assert st.status is Status.COMPLETED and st.received == len(blob_bytes)


async def test_one_piece_blobs_are_stored_whole(pair: Pair) -> None:
    a = await pair.peer(1, config=fast_config(verify_reads=False))
    b = await pair.peer(2)
    small = os.urandom(16 * 1024)
    bid = add(a.store, small)
    chid = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    assert (await asyncio.wait_for(b.mgr.wait(chid), T)).received == len(small)
    c = await pair.peer(3)
    chid = await b.mgr.open_push(c.id, Voucher("any"), bid)
    await asyncio.wait_for(b.mgr.wait(chid), T)
    for p in (b, c):
        assert p.store.get_data(bid, LeaseId.new("t")) == small
    other = add(a.store, os.urandom(1000))
    corrupt(a.store.layout.data_path(other), 10, b"\x00\x01")
    bad = await c.mgr.open_pull(a.id, Voucher("any"), other)
    with pytest.raises(BadPeerDataError):
        await asyncio.wait_for(c.mgr.wait(bad), T)
    with pytest.raises(BlobNotFoundError):
        c.store.info(other)


@pytest.mark.parametrize("pull", [True, False])
async def test_an_empty_blob_moves_without_waiting_for_a_stall(pair: Pair, pull: bool) -> None:
    a = await pair.peer(1)
    b = await pair.peer(2)
    bid = add(a.store, b"")
    if pull:
        chid = await b.mgr.open_pull(a.id, Voucher("any"), bid)
        st = await asyncio.wait_for(b.mgr.wait(chid), 5)  # the stall timeout is 30 s
    else:
        chid = await a.mgr.open_push(b.id, Voucher("any"), bid)
        st = await asyncio.wait_for(a.mgr.wait(chid), 5)
    assert st.status is Status.COMPLETED and st.restarts == 0
    assert b.store.has(bid)
