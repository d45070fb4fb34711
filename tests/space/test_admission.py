"""Admission: the handshake (v2, the dialer proves first), its bounds, and who counts as a
member.  The state machines alone, then a Space on the real TLS transport."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from blobmesh.errors import AdmissionError, InvalidOpError, TransportError
from blobmesh.space import Limits, Metrics, Op, Seed, Space, SpaceConfig, admission, wire
from blobmesh.space.bootstrap import BootstrapServer, serve_bootstrap
from blobmesh.space.records import sign_op, sign_record
from blobmesh.transport import Endpoint, Identity, NodeId, TransportConfig
from blobmesh.transport.memory import MemoryHub
from tests.space.util import FAST, RawPeer, cluster, config, full_view
from tests.util import eventually

A, B = Identity.generate().node_id, Identity.generate().node_id
ADMISSION_TIMEOUT = 1.5
N1, N2 = b"1" * admission.NONCE_SIZE, b"2" * admission.NONCE_SIZE


def handshake(dialer_cfg: SpaceConfig, acceptor_cfg: SpaceConfig
              ) -> tuple[admission.DialerHandshake, wire.Handshake]:
    """Run the messages between the two state machines; the acceptor's last message."""
    d = admission.DialerHandshake(dialer_cfg, A, B, N1)
    acc = admission.AcceptorHandshake(acceptor_cfg, B, A, N2)
    challenge = acc.on_hello(d.hello())
    if isinstance(challenge, wire.Refused):
        return d, challenge
    return d, acc.on_auth(d.on_challenge(challenge))


def test_handshake_admits_only_the_same_secret() -> None:
    good = SpaceConfig(name="s", secret=b"k" * 32)
    d, last = handshake(good, good)
    assert isinstance(last, wire.Welcome)
    d.on_welcome(last)  # the acceptor's proof checks out
    for other in (SpaceConfig(name="s", secret=b"x" * 32), SpaceConfig(name="s"),
                  SpaceConfig(name="t", secret=b"k" * 32)):
        _, last = handshake(other, good)
        assert isinstance(last, wire.Refused)
    # an acceptor that does not know the secret cannot fake its welcome either
    d = admission.DialerHandshake(good, A, B, N1)
    d.on_challenge(wire.Challenge(N2))
    with pytest.raises(AdmissionError, match="bad proof"):
        d.on_welcome(wire.Welcome(os.urandom(32)))
    stranger = SpaceConfig(name="s", secret=b"x" * 32)
    forged = admission.proof(stranger, b"acceptor", B, A, N1, N2)
    with pytest.raises(AdmissionError):
        d.on_welcome(wire.Welcome(forged))


def test_challenge_carries_nothing_derived_from_the_secret() -> None:
    # the only message an unproven dialer gets before refusal is the acceptor's nonce
    assert wire.Challenge.__struct_fields__ == ("nonce",)
    acc = admission.AcceptorHandshake(SpaceConfig(name="s", secret=b"k" * 32), B, A, N2)
    assert acc.on_hello(wire.Hello("s", wire.VERSION, N1)) == wire.Challenge(N2)
    assert acc.on_auth(wire.Auth(os.urandom(32))) == wire.Refused("bad proof")


def test_old_handshake_version_is_refused_with_the_reason() -> None:
    acc = admission.AcceptorHandshake(SpaceConfig(name="s"), B, A, N2)
    refused = acc.on_hello(wire.Hello("s", 1, N1))
    assert isinstance(refused, wire.Refused) and "unsupported version 1" in refused.reason


# --- a Space on the real transport ----------------------------------------------------------


@asynccontextmanager
async def tls_space(tmp_path: Path, secret: bytes | None, **limits: int
                    ) -> AsyncIterator[tuple[Endpoint, Space]]:
    async with AsyncExitStack() as stack:
        ident = Identity.generate()
        ep = await stack.enter_async_context(await Endpoint.start(
            ident, config=TransportConfig(admission_timeout=ADMISSION_TIMEOUT)))
        timing = dataclasses.replace(FAST, handshake_timeout=0.5)
        cfg = SpaceConfig(name="s", secret=secret, timing=timing,
                          limits=dataclasses.replace(Limits(), **limits))
        space = await stack.enter_async_context(
            Space(cfg, ident, ep, tmp_path / f"{ident.node_id.short()}.sqlite",
                  on_admitted=ep.mark_admitted))
        yield ep, space


async def stranger_session(stranger: Endpoint, target: NodeId) -> list[bytes]:
    """Hello, then a guessed proof: every message received back, raw."""
    got = []
    stream = await stranger.open_stream(target, wire.PROTOCOL)
    await stream.send(wire.encode(wire.Hello("s", wire.VERSION, os.urandom(16))))
    got.append(await stream.recv())
    await stream.send(wire.encode(wire.Auth(os.urandom(32))))
    got.append(await stream.recv())
    with pytest.raises(TransportError):  # then the stream ends
        got.append(await stream.recv())
    return got


async def test_an_unproven_dialer_receives_nothing_verifiable(tmp_path: Path) -> None:
    async with tls_space(tmp_path, b"secret one " * 3) as (ep1, s1), \
            tls_space(tmp_path, b"secret two " * 3) as (ep2, s2), \
            await Endpoint.start(Identity.generate()) as stranger:
        seen = []
        for ep in (ep1, ep2):
            stranger.add_peer_addresses(ep.node_id, ep.ticket.addrs)
            challenge, refusal = await stranger_session(stranger, ep.node_id)
            msg = wire.decode_handshake(challenge, Limits(), Metrics())
            assert isinstance(msg, wire.Challenge) and len(msg.nonce) == admission.NONCE_SIZE
            assert challenge == wire.encode(wire.Challenge(msg.nonce))  # a nonce and no more
            seen.append(refusal)
        # apart from a fresh random nonce, what the stranger got does not depend on the
        # secret at all: there is nothing to test guesses against offline
        assert seen[0] == seen[1] == wire.encode(wire.Refused("bad proof"))
        assert s1.metrics["admission_refused"] == s2.metrics["admission_refused"] == 1


async def test_silent_handshakes_are_cut_and_capped(tmp_path: Path) -> None:
    async with tls_space(tmp_path, b"k" * 32, max_handshakes=2) as (ep, space), \
            await Endpoint.start(Identity.generate()) as stranger, \
            await Endpoint.start(Identity.generate()) as member_ep:
        stranger.add_peer_addresses(ep.node_id, ep.ticket.addrs)
        member_ep.add_peer_addresses(ep.node_id, ep.ticket.addrs)
        member = RawPeer(None, space.config, network=member_ep, identity=member_ep.identity)
        assert isinstance(await member.connect(ep.node_id), wire.Welcome)
        await member.join()
        silent = [await stranger.open_stream(ep.node_id, wire.PROTOCOL) for _ in range(2)]
        for s in silent:  # hello, then never a proof
            await s.send(wire.encode(wire.Hello("s", wire.VERSION, os.urandom(16))))
            assert isinstance(wire.decode_handshake(await s.recv(), Limits(), Metrics()),
                              wire.Challenge)
        third = await stranger.open_stream(ep.node_id, wire.PROTOCOL)
        await third.send(wire.encode(wire.Hello("s", wire.VERSION, os.urandom(16))))
        with pytest.raises(TransportError):
            await third.recv()  # reset at once: two handshakes are already in progress
        assert space.metrics["limit_handshakes"] == 1
        # a member is not held up by the strangers
        again = RawPeer(None, space.config, network=member_ep, identity=member_ep.identity)
        assert isinstance(await again.connect(ep.node_id), wire.Welcome)
        t0 = time.monotonic()
        for s in silent:
            with pytest.raises(TransportError):
                await s.recv()
        assert time.monotonic() - t0 < 3  # handshake_timeout 0.5 s, not the 3 s default
        await eventually(lambda: space.metrics["handshake_timeouts"] == 2, 5)
        later = await stranger.open_stream(ep.node_id, wire.PROTOCOL)  # the slots are free
        await later.send(wire.encode(wire.Hello("s", wire.VERSION, os.urandom(16))))
        assert isinstance(wire.decode_handshake(await later.recv(), Limits(), Metrics()),
                          wire.Challenge)


async def test_the_transport_keeps_members_and_drops_strangers(tmp_path: Path) -> None:
    async with tls_space(tmp_path, b"k" * 32) as (ep, space), \
            await Endpoint.start(Identity.generate()) as stranger, \
            await Endpoint.start(Identity.generate()) as member_ep:
        for e in (stranger, member_ep):
            e.add_peer_addresses(ep.node_id, ep.ticket.addrs)
        member = RawPeer(None, space.config, network=member_ep, identity=member_ep.identity)
        assert isinstance(await member.connect(ep.node_id), wire.Welcome)
        await stranger_session(stranger, ep.node_id)  # refused, its connection still open
        t0 = time.monotonic()
        await eventually(lambda: ep.node_id not in stranger.connected_peers(), 10)
        assert time.monotonic() - t0 < ADMISSION_TIMEOUT + 2
        await asyncio.sleep(max(0.0, ADMISSION_TIMEOUT + 0.5 - (time.monotonic() - t0)))
        assert isinstance(await member.request(wire.Ping(1)), wire.Ack)  # kept: admitted


# --- who is a member ----------------------------------------------------------------------


async def test_admitted_peers_are_marked_in_the_transport(tmp_path: Path) -> None:
    hub = MemoryHub()
    async with AsyncExitStack() as stack:
        spaces: list[Space] = []
        admitted: list[list[NodeId]] = []
        for i in range(3):
            ident = Identity.generate()
            marked: list[NodeId] = []
            seeds = (Seed(spaces[0].node_id),) if spaces else ()
            space = await stack.enter_async_context(
                Space(config(secret=b"k" * 32, seeds=seeds), ident, hub.node(ident.node_id),
                      tmp_path / f"{i}.sqlite", on_admitted=marked.append))
            await space.join()
            spaces.append(space)
            admitted.append(marked)
        await eventually(lambda: all(len(s.peers()) == 2 for s in spaces), 10)
        for s, marked in zip(spaces, admitted, strict=True):
            # every member is marked, whether we met it or an admitted peer vouched for it
            assert {p.node_id for p in s.peers()} <= set(marked)


async def test_bootstrap_records_of_a_closed_space_are_only_seeds(tmp_path: Path) -> None:
    srv = BootstrapServer()
    runner = await serve_bootstrap(srv, "127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    try:
        stranger = Identity.generate()  # knows the space name, not the secret
        now = int(time.time() * 1000)
        srv.put("default", sign_record(stranger, space="default", addresses=["127.0.0.1:9"],
                                       groups=[], capabilities={}, created_at=now,
                                       expires_at=now + 60_000))
        async with cluster(tmp_path) as c:
            cfg = config(secret=b"k" * 32, bootstrap_urls=(url,))
            first = await c.add(cfg)
            second = await c.add(cfg)  # meets first through the bootstrap server
            await eventually(lambda: full_view(c), 10)
            for n in (first, second):
                assert not n.space.is_member(stranger.node_id)
                assert stranger.node_id not in {p.node_id for p in n.space.peers()}
    finally:
        await runner.cleanup()


async def test_ops_count_only_from_current_members(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        target = await c.add()
        other = await c.add(seed=target)
        await eventually(lambda: full_view(c), 10)
        raw = RawPeer(c.hub, target.space.config)
        assert isinstance(await raw.connect(target.id), wire.Welcome)
        now = int(time.time() * 1000)

        def op(author: Identity, payload: bytes) -> bytes:
            return sign_op(author, space="default", kind="test", timestamp=now,
                           payload=payload, limits=Limits()).raw

        outsider = Identity.generate()  # never admitted, its op pushed by an admitted peer
        assert isinstance(await raw.request(wire.PushOps(1, [op(outsider, b"a")], True)),
                          wire.Ack)
        # the pusher itself holds no record yet: not a member either
        assert isinstance(await raw.request(wire.PushOps(2, [op(raw.identity, b"b")], True)),
                          wire.Ack)
        assert target.space.ops() == []
        assert target.space.metrics["ops_rejected_non_member"] == 2
        await raw.join()
        ok = op(raw.identity, b"c")
        assert isinstance(await raw.request(wire.PushOps(3, [ok], True)), wire.Ack)
        await eventually(lambda: [o.raw for o in other.space.ops()] == [ok], 5)
        await asyncio.sleep(0.3)  # gossip rounds: the refused ops went nowhere
        assert [o.raw for o in target.space.ops()] == [ok]
        assert [o.raw for o in other.space.ops()] == [ok]


async def test_an_op_refused_before_its_authors_record_arrives_comes_later(
        tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        target = await c.add()
        other = await c.add(seed=target)
        await eventually(lambda: full_view(c), 10)
        author = RawPeer(c.hub, other.space.config)
        assert isinstance(await author.connect(other.id), wire.Welcome)
        await author.join()  # a member at `other`; `target` has not heard of it yet
        op = sign_op(author.identity, space="default", kind="test",
                     timestamp=int(time.time() * 1000), payload=b"early", limits=Limits()).raw
        early = RawPeer(c.hub, target.space.config, network=author.node,
                        identity=author.identity)
        assert isinstance(await early.connect(target.id), wire.Welcome)
        assert isinstance(await early.request(wire.PushOps(1, [op], False)), wire.Ack)
        assert target.space.metrics["ops_rejected_non_member"] == 1
        assert isinstance(await author.request(wire.PushOps(2, [op], False)), wire.Ack)
        # refused while its author was unknown, not lost: it comes with the author's record
        await eventually(lambda: [o.raw for o in target.space.ops()] == [op], 5)


async def test_an_op_depending_on_a_later_one_of_its_batch_is_kept(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        target = await c.add(kinds=("base",))

        def needs_base(op: Op) -> None:
            if not any(b.payload == op.payload for b in target.space.stored_ops("base")):
                raise InvalidOpError("no such base")

        target.space.register_op_kind("dep", needs_base)
        raw = RawPeer(c.hub, target.space.config)
        assert isinstance(await raw.connect(target.id), wire.Welcome)
        await raw.join()
        now = int(time.time() * 1000)
        dep, base = (sign_op(raw.identity, space="default", kind=k, timestamp=now,
                             payload=b"x", limits=Limits()).raw for k in ("dep", "base"))
        assert isinstance(await raw.request(wire.PushOps(1, [dep, base], False)), wire.Ack)
        assert {o.raw for o in target.space.ops()} == {dep, base}


async def test_ops_of_a_member_who_left_are_kept_but_no_longer_relayed(
        tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        stays = await c.add()
        leaver = await c.add(seed=stays)
        await eventually(lambda: full_view(c), 10)
        op = await leaver.space.publish("test", b"before leaving")
        await eventually(lambda: stays.space.ops() == [op], 5)
        await leaver.space.leave()
        await eventually(lambda: not stays.space.is_member(leaver.id), 5)
        newcomer = await c.add(seed=stays)
        await eventually(lambda: newcomer.space.is_member(stays.id), 10)
        # summaries agree (no endless re-listing of ops one side refuses), nothing relayed
        await eventually(lambda: stays.space.op_store.digest() ==
                         newcomer.space.op_store.digest(), 5)
        await asyncio.sleep(0.3)
        assert stays.space.ops() == [op] and newcomer.space.ops() == []
        assert newcomer.space.metrics["ops_rejected"] == 0  # never even offered
