"""Random message sequences only ever produce typed errors."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobmesh.errors import BlobmeshError
from blobmesh.transfer.channel import Channel
from blobmesh.transfer.messages import (
    Ack,
    Cancel,
    Complete,
    Data,
    Error,
    Layer,
    Message,
    Pause,
    Request,
    Response,
    Resume,
    Selector,
    VoucherResult,
    VoucherUpdate,
    decode,
    encode,
)
from tests.transfer.sim import Sim

small = st.integers(min_value=0, max_value=12)
blob = st.binary(min_size=0, max_size=40)
layers = st.builds(Layer, st.integers(0, 10**6), st.sampled_from([1, 16384, 3]), blob)
selectors = st.one_of(st.just(Selector()), st.builds(Selector.piece_set, st.sets(small)))

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Data, small, st.integers(0, 20000), st.binary(max_size=64).map(memoryview)),
    st.builds(Ack, st.lists(small, max_size=5)),
    st.builds(Response, st.booleans(), st.booleans(), st.text(max_size=3), blob,
              st.text(max_size=5), st.none() | layers, st.none() | blob),
    st.builds(Pause), st.builds(Resume), st.builds(Complete),
    st.builds(VoucherUpdate, st.text(max_size=3), blob),
    st.builds(VoucherResult, st.booleans(), st.booleans(), st.booleans()),
    st.builds(Cancel, st.text(max_size=5)), st.builds(Error, st.text(max_size=5)),
    st.builds(Request, st.integers(0, 10), st.booleans(), blob, st.text(max_size=3), blob,
              selectors, st.booleans(), st.booleans(), st.none() | layers, st.none() | blob),
)


def _feed(ch: Channel, msgs: list[Message]) -> None:
    for m in msgs:
        with contextlib.suppress(BlobmeshError):
            ch.receive(m)
            ch.tick(1.0)
            ch.next_piece(1 << 20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.integers(0, 3), st.lists(messages, max_size=12),
       st.lists(messages, max_size=12))
def test_random_messages_give_typed_errors(pull: bool, warmup: int, to_init: list[Message],
                                           to_resp: list[Message]) -> None:
    sim = Sim(pull, pieces=4)
    sim.open()
    sim.accept_request()
    for _ in range(warmup):  # move a little data first, so later states are fuzzed too
        i = sim.sender.next_piece(sim.window)
        if i is not None:
            sim.send_piece(i)
        while sim.to_init or sim.to_resp:
            if sim.to_init:
                sim.apply(sim.init, sim.init.receive(sim.to_init.popleft()))
            if sim.to_resp:
                assert sim.resp is not None
                sim.apply(sim.resp, sim.resp.receive(sim.to_resp.popleft()))
    _feed(sim.init, to_init)
    assert sim.resp is not None
    _feed(sim.resp, to_resp)


@settings(max_examples=150, deadline=None)
@given(messages)
def test_responder_creation_and_codec(msg: Message) -> None:
    assert decode(encode(msg)) == msg
    if isinstance(msg, Request):
        sim = Sim(True, pieces=2)
        with contextlib.suppress(BlobmeshError):
            Channel.respond(msg, sim.chid.initiator, sim.chid.responder, sim.clock)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_only_raises_protocol_error(raw: bytes) -> None:
    with contextlib.suppress(BlobmeshError):
        decode(raw)
