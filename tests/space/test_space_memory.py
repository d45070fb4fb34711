"""The async layer over MemoryHub: many nodes in one process."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import msgspec
import pytest

from blobmesh.errors import AdmissionError, InvalidOpError, SpaceLimitError, TransportError
from blobmesh.space import Limits, Op, Seed, Space, wire
from blobmesh.space.records import sign_op, sign_record
from blobmesh.transport.identity import Identity
from tests.space.util import FAST, Cluster, RawPeer, cluster, config, full_view
from tests.util import eventually


async def grow(c: Cluster, n: int, **cfg: object) -> None:
    first = await c.add(config(**cfg))
    for _ in range(n - 1):
        await c.add(config(**cfg), seed=first)


async def test_convergence_publish_and_subscribe(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        await grow(c, 12)
        await eventually(lambda: full_view(c))
        subs = [n.space.subscribe("test") for n in c.nodes]
        op = await c.nodes[5].space.publish("test", b"payload")
        await eventually(lambda: all(n.space.ops("test") == [op] for n in c.nodes), within=2)
        for sub in subs:
            got = await asyncio.wait_for(sub.__anext__(), 1)
            assert got == op
            sub.close()


async def test_capability_and_group_queries(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        first = await c.add(config(groups=("core",)))
        await c.add(config(groups=("edge",), capabilities={"gpu": True, "mem_gb": 64}),
                    seed=first)
        await c.add(config(groups=("edge",), capabilities={"gpu": False, "mem_gb": 8,
                                                           "arch": "arm64"}), seed=first)
        await eventually(lambda: full_view(c))
        s = first.space
        assert {p.node_id for p in s.peers(group="edge")} == {c.nodes[1].id, c.nodes[2].id}
        assert [p.node_id for p in s.peers(capability="gpu=true,mem_gb>=16")] == [c.nodes[1].id]
        assert [p.node_id for p in s.peers(capability="arch in [arm64,amd64]")] == [c.nodes[2].id]
        assert [p.node_id for p in s.peers(group="core", include_self=True)] == [first.id]
        info = s.peers(group="edge")[0].to_json()
        assert info["alive"] is True and "capabilities" in info


async def test_forged_record_is_rejected_over_the_wire(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        await grow(c, 3)
        await eventually(lambda: full_view(c))
        victim, target = c.nodes[1], c.nodes[0]
        raw = RawPeer(c.hub, target.space.config)
        assert isinstance(await raw.connect(target.id), wire.Welcome)
        forger = Identity.generate()
        good = sign_record(victim.identity, space="default", addresses=["6.6.6.6:1"],
                           groups=[], capabilities={}, created_at=int(time.time() * 1000) + 10,
                           expires_at=int(time.time() * 1000) + 60_000)
        body, _ = msgspec.msgpack.decode(good)
        forged = msgspec.msgpack.encode([body, forger.sign(b"blobmesh/space/record/v1\0" + body)])
        assert isinstance(await raw.request(wire.PushRecords(1, [forged], True)), wire.Ack)
        assert target.space.metrics["records_rejected"] == 1
        rec = target.space.peer_store.get(victim.id)
        assert rec is not None and rec.addresses != ("6.6.6.6:1",)


async def test_tombstone_spreads_and_peer_is_forgotten(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        await grow(c, 6)
        await eventually(lambda: full_view(c))
        leaver = c.nodes[3]
        await leaver.space.leave()
        rest = [n for n in c.nodes if n is not leaver]
        await eventually(lambda: full_view(c, rest), within=2)
        for n in rest:
            rec = n.space.peer_store.get(leaver.id)
            assert rec is not None and rec.tombstone  # kept, so old records cannot return
            assert n.space.peer_meta(leaver.id) is None


async def test_partition_and_heal(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        await grow(c, 6)
        await eventually(lambda: full_view(c))
        cut = c.nodes[4:]
        for n in cut:
            n.net.set_online(False)
        main = c.nodes[:4]
        await eventually(lambda: all(not n.space.is_alive(x.id) for n in main for x in cut),
                         within=5)
        op = await main[0].space.publish("test", b"during partition")
        await eventually(lambda: all(n.space.ops() == [op] for n in main), within=2)
        assert all(n.space.ops() == [] for n in cut)
        for n in cut:
            n.net.set_online(True)
        await eventually(lambda: full_view(c), within=5)
        await eventually(lambda: all(n.space.ops() == [op] for n in c.nodes), within=5)


async def test_killed_node_is_marked_unresponsive(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        await grow(c, 5)
        await eventually(lambda: full_view(c))
        dead = c.nodes[2]
        await dead.space.aclose()
        dead.net.set_online(False)
        others = [n for n in c.nodes if n is not dead]
        t0 = asyncio.get_running_loop().time()
        await eventually(lambda: all(not n.space.is_alive(dead.id) for n in others), within=3)
        took = asyncio.get_running_loop().time() - t0
        bound = 2 * 5 * FAST.probe_interval + FAST.probe_timeout + FAST.indirect_timeout
        assert took < bound + 0.5
        meta = others[0].space.peer_meta(dead.id)
        assert meta is not None and meta.unresponsive
        assert others[0].space.peers(alive_only=False)


async def test_admission_refuses_other_spaces_secrets_and_allowlists(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        home = await c.add(config(secret=b"s3cret"))
        for cfg in (config(secret=b"wrong"), config(name="other", secret=b"s3cret"),
                    config()):
            raw = RawPeer(c.hub, cfg)
            assert isinstance(await raw.connect(home.id), wire.Refused)
        intruder = await c.add(config(secret=b"wrong"), seed=home)
        await asyncio.sleep(0.3)
        assert home.space.peers() == [] and intruder.space.peers() == []
        # the dialer proves first (handshake v2): home refuses the 3 raw peers and every
        # attempt of the intruder, which learns it was refused and nothing more
        assert home.space.metrics["admission_refused"] >= 4
        assert intruder.space.metrics["admission_refused"] >= 1
        meta = intruder.space.peer_meta(home.id)
        assert meta is not None and meta.failures >= 1 and meta.backoff_until > 0
        with pytest.raises((AdmissionError, TransportError)):  # refused, then backing off
            await intruder.space.send_notify(home.id, b"hi")
        friend = await c.add(config(secret=b"s3cret"), seed=home)
        await eventually(lambda: full_view(c, [home, friend]))
        allowed = Identity.generate()
        only = config(secret=b"s3cret", allowlist=frozenset({allowed.node_id}))
        locked = await c.add(only, seed=home)
        await asyncio.sleep(0.3)
        assert locked.space.peers() == []


async def test_notify(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        await grow(c, 2)
        await eventually(lambda: full_view(c))
        got: asyncio.Queue[tuple[object, bytes]] = asyncio.Queue()
        plain: list[tuple[object, bytes]] = []

        async def handler(peer: object, data: bytes) -> None:
            await got.put((peer, data))

        space = c.nodes[1].space
        space.notify_handler(b"pi", handler)
        space.notify_handler(b"x", lambda peer, data: plain.append((peer, data)))
        for clash in (b"p", b"pin", b""):
            with pytest.raises(ValueError):
                space.notify_handler(clash, handler)
        await c.nodes[0].space.send_notify(c.nodes[1].id, b"ping!")
        assert await asyncio.wait_for(got.get(), 1) == (c.nodes[0].id, b"ng!")
        await c.nodes[0].space.send_notify(c.nodes[1].id, b"xyz")
        await c.nodes[0].space.send_notify(c.nodes[1].id, b"nobody's")
        await eventually(lambda: space.metrics["notify_unhandled"] == 1 and
                         plain == [(c.nodes[0].id, b"yz")])
        space.notify_handler(b"x", None)
        await c.nodes[0].space.send_notify(c.nodes[1].id, b"xyz")
        await eventually(lambda: space.metrics["notify_unhandled"] == 2)
        assert plain == [(c.nodes[0].id, b"yz")] and got.empty()
        too_big = b"x" * (Limits().max_notify_bytes + 1)
        with pytest.raises(SpaceLimitError):
            await c.nodes[0].space.send_notify(c.nodes[1].id, too_big)


async def test_unknown_kinds_and_validators_reject_ops(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        first = await c.add(kinds=("test", "other"))
        picky = await c.add(seed=first, kinds=())

        def no_evil(op: Op) -> None:
            if op.payload == b"evil":
                raise InvalidOpError("evil payload")

        picky.space.register_op_kind("test", no_evil)
        await eventually(lambda: full_view(c))
        with pytest.raises(InvalidOpError):
            await first.space.publish("nope", b"")
        await first.space.publish("other", b"x")
        await first.space.publish("test", b"evil")
        ok = await first.space.publish("test", b"fine")
        await eventually(lambda: picky.space.ops() == [ok])
        await asyncio.sleep(0.3)  # a gossip round or two: still rejected, never stored
        assert picky.space.ops() == [ok] and picky.space.metrics["ops_rejected"] >= 2


async def test_op_flood_is_rate_limited_without_losing_ops(tmp_path: Path) -> None:
    lim = dataclasses.replace(Limits(), ops_per_second=100, ops_burst=50)
    async with cluster(tmp_path) as c:
        target = await c.add(config(limits=lim))
        raw = RawPeer(c.hub, target.space.config)
        assert isinstance(await raw.connect(target.id), wire.Welcome)
        await raw.join()  # only members' ops count
        now = int(time.time() * 1000)
        ops = [sign_op(raw.identity, space="default", kind="test", timestamp=now,
                       payload=b"%d" % i, limits=lim).raw for i in range(400)]
        answers = [await raw.request(wire.PushOps(i, ops[i * 20:(i + 1) * 20], False))
                   for i in range(20)]
        busy = [a for a in answers if isinstance(a, wire.Busy)]
        assert busy and all(b.retry_after_ms > 0 for b in busy)
        assert target.space.metrics["limit_peer_op_rate"] == len(busy)
        assert len(target.space.ops(limit=1000)) == 20 * (20 - len(busy))


async def test_oversized_message_rejected_before_decode(tmp_path: Path) -> None:
    lim = dataclasses.replace(Limits(), max_message_bytes=4096)
    async with cluster(tmp_path) as c:
        target = await c.add(config(limits=lim))
        raw = RawPeer(c.hub, target.space.config)
        assert isinstance(await raw.connect(target.id), wire.Welcome)
        assert raw.stream is not None
        await raw.stream.send(b"\x92" + b"\xff" * 5000)  # not even valid msgpack
        with pytest.raises(TransportError):
            await raw.stream.recv()
        assert target.space.metrics["limit_message_bytes"] == 1
        assert target.space.metrics["malformed_messages"] == 0
        again = RawPeer(c.hub, target.space.config)
        assert isinstance(await again.connect(target.id), wire.Welcome)
        assert isinstance(await again.request(wire.Ping(1)), wire.Ack)


async def test_records_are_republished_before_expiry(tmp_path: Path) -> None:
    timing = dataclasses.replace(FAST, record_ttl=1.0, maintenance_interval=0.1)
    async with cluster(tmp_path) as c:
        await grow(c, 3, timing=timing)
        await eventually(lambda: full_view(c))
        first = c.nodes[0].space.local_record
        assert first is not None
        await asyncio.sleep(1.5)  # longer than the ttl: only republishing keeps peers known
        assert full_view(c)
        latest = c.nodes[0].space.local_record
        assert latest is not None and latest.created_at > first.created_at
        assert c.nodes[0].space.metrics["records_republished"] >= 1


async def test_restart_keeps_ops_and_signs_later_records(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        node = await c.add()
        op = await node.space.publish("test", b"kept")
        before = node.space.local_record
        await node.space.aclose()
        space = Space(node.space.config, node.identity, node.net, tmp_path / "n0.sqlite",
                      clock=lambda: 0.0)
        space.register_op_kind("test")
        await space.start()
        try:
            assert space.ops() == [op]
            assert space.peer_store.get(node.id) is None  # "expired" under the clock of 1970
            rec = await space.join()
            assert before is not None and rec.created_at > before.created_at
        finally:
            await space.aclose()


async def test_signer_and_network_must_agree(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        node = await c.add()
        with pytest.raises(Exception, match="different nodes"):
            Space(config(seeds=(Seed(node.id),)), Identity.generate(), node.net,
                  tmp_path / "x.sqlite")


async def test_slow_subscriber_is_told_not_skipped(tmp_path: Path) -> None:
    lim = dataclasses.replace(Limits(), subscriber_queue=2)
    async with cluster(tmp_path) as c:
        node = await c.add(config(limits=lim))
        sub = node.space.subscribe("test")
        ops = [await node.space.publish("test", b"%d" % i) for i in range(3)]
        assert [await sub.__anext__() for _ in range(2)] == ops[:2]
        with pytest.raises(SpaceLimitError):
            await sub.__anext__()
        assert node.space.metrics["limit_subscriber"] == 1
        assert set(node.space.stored_ops("test")) == set(ops)  # the gap can be read back
