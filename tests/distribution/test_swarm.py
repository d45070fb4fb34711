"""The swarm engine over in-memory networks: many peers, rarest first, bans, priorities."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from blobmesh.distribution import swarm as swarm_module
from blobmesh.distribution.model import Priority
from blobmesh.distribution.peerwire import (
    PROTOCOL,
    LayerWanted,
    SwarmSession,
)
from blobmesh.distribution.swarm import BanKind, SwarmConfig, SwarmEngine, _PieceIo
from blobmesh.errors import TransferError
from blobmesh.hashing import BlobId
from blobmesh.store import Bitfield, LeaseId, Store
from blobmesh.tasks import TaskOwner
from blobmesh.transport import Endpoint, Identity, Stream
from blobmesh.transport.identity import NodeId
from blobmesh.transport.memory import MemoryHub
from tests.distribution.hostile import HostilePeer
from tests.util import eventually

MiB = 1024 * 1024


@dataclass
class Peer:
    node_id: NodeId
    store: Store
    engine: SwarmEngine


def nid(i: int) -> NodeId:
    return NodeId(bytes([i]) * 32)


@asynccontextmanager
async def swarm(tmp_path: Path, n: int, config: SwarmConfig | None = None,
                source_config: SwarmConfig | None = None) -> AsyncIterator[list[Peer]]:
    hub = MemoryHub()
    peers: list[Peer] = []
    async with AsyncExitStack() as stack:
        for i in range(n):
            store = stack.enter_context(Store(tmp_path / f"n{i}"))
            node = hub.node(nid(i + 1))
            cfg = source_config if i == 0 and source_config else config
            engine = SwarmEngine(store, node, cfg or SwarmConfig(stall_timeout=5))
            await engine.start()
            stack.push_async_callback(engine.aclose)
            stack.push_async_callback(node.aclose)
            peers.append(Peer(node.node_id, store, engine))
        yield peers


def seed(peer: Peer, size: int) -> tuple[BlobId, bytes, int]:
    data = os.urandom(size)
    info = peer.store.add_bytes(data, LeaseId.new("seed"))
    return info.blob_id, data, info.piece_size


async def test_all_targets_complete_and_share_load(tmp_path: Path) -> None:
    # a slow source (16 MiB/s) must not send every copy itself: targets relay to each other
    slow_source = SwarmConfig(upload_rate=16 * 1024 * 1024, stall_timeout=5)
    async with swarm(tmp_path, 5, source_config=slow_source) as peers:
        blob, data, piece_size = seed(peers[0], 16 * 1024 * 1024 + 77)
        everyone = [p.node_id for p in peers]
        await asyncio.wait_for(asyncio.gather(*(
            p.engine.download(blob, len(data), piece_size, lambda: everyone, pin="t")
            for p in peers[1:])), 30)
        for p in peers[1:]:
            assert p.store.get_data(blob, LeaseId.new("check")) == data
            assert [pin.name for pin in p.store.pins()] == ["t"]
        uploaded_by_targets = sum(p.engine.bytes_uploaded for p in peers[1:])
        # of the four copies needed, the targets relayed most; the source sent ~one
        assert uploaded_by_targets >= 2.4 * len(data)
        assert peers[0].engine.bytes_uploaded < 1.6 * len(data)
        # haves go only where they are news (or acknowledge the uploader): fewer than every
        # piece to every other peer, since pieces relayed by targets are not told the source
        pieces = -(-len(data) // piece_size)
        for p in peers[1:]:
            assert 0 < p.engine.have_messages <= p.engine.pieces_announced + len(peers)
            assert 0 < p.engine.pieces_announced < pieces * (len(peers) - 1)
        assert peers[0].engine.have_messages == 0  # a seed has nothing to announce


async def test_completes_from_targets_after_source_dies(tmp_path: Path) -> None:
    async with swarm(tmp_path, 3) as peers:
        blob, data, piece_size = seed(peers[0], 2 * 1024 * 1024)
        everyone = [p.node_id for p in peers]
        await peers[1].engine.download(blob, len(data), piece_size, lambda: everyone)
        hub_node = peers[0].engine.network
        assert hasattr(hub_node, "aclose")
        await hub_node.aclose()
        await asyncio.wait_for(
            peers[2].engine.download(blob, len(data), piece_size, lambda: everyone), 20)
        assert peers[2].store.get_data(blob, LeaseId.new("c")) == data


async def test_corrupting_peer_is_banned(tmp_path: Path) -> None:
    async with swarm(tmp_path, 3) as peers:
        blob, data, piece_size = seed(peers[0], 3 * 1024 * 1024)
        # peer 1 holds the blob but its data file is corrupted on disk after the add
        peers[1].store.add_bytes(data, LeaseId.new("seed"))
        path = peers[1].store.layout.data_path(blob)
        path.write_bytes(b"\xff" * 4096 + path.read_bytes()[4096:])
        everyone = [p.node_id for p in peers]
        await asyncio.wait_for(
            peers[2].engine.download(blob, len(data), piece_size, lambda: everyone), 20)
        assert peers[2].store.get_data(blob, LeaseId.new("c")) == data
        # the corrupt holder refused to serve its rotten piece rather than sending it
        assert peers[2].engine.pieces_rejected == 0


async def test_unreachable_blob_stalls_with_clear_error(tmp_path: Path) -> None:
    async with swarm(tmp_path, 2, SwarmConfig(stall_timeout=0.5)) as peers:
        blob, data, piece_size = seed(peers[0], 1024 * 1024)
        await peers[0].engine.network.aclose()  # type: ignore[attr-defined]
        with pytest.raises(TransferError):
            await asyncio.wait_for(peers[1].engine.download(
                blob, len(data), piece_size, lambda: [peers[0].node_id]), 10)


async def test_high_priority_finishes_first(tmp_path: Path) -> None:
    cfg = SwarmConfig(download_rate=8 * 1024 * 1024, pipeline=2, stall_timeout=10)
    async with swarm(tmp_path, 2, cfg) as peers:
        big, big_data, big_ps = seed(peers[0], 8 * 1024 * 1024)
        small, small_data, small_ps = seed(peers[0], 2 * 1024 * 1024)
        src = [peers[0].node_id]
        order: list[str] = []

        async def get(blob: BlobId, size: int, ps: int, prio: Priority, name: str) -> None:
            await peers[1].engine.download(blob, size, ps, lambda: src, prio)
            order.append(name)

        low = asyncio.create_task(get(big, len(big_data), big_ps, Priority.LOW, "low"))
        await asyncio.sleep(0.2)
        high = asyncio.create_task(get(small, len(small_data), small_ps, Priority.HIGH, "high"))
        await asyncio.wait_for(asyncio.gather(low, high), 30)
        assert order == ["high", "low"]


class LyingEngine(SwarmEngine):
    """A peer that serves every piece with one byte flipped."""

    def _read_piece(self, blob_id: BlobId, index: int) -> bytes:
        data = bytearray(super()._read_piece(blob_id, index))
        data[0] ^= 0xFF
        return bytes(data)


async def test_lying_peer_is_banned_and_data_still_arrives(tmp_path: Path) -> None:
    hub = MemoryHub()
    async with AsyncExitStack() as stack:
        stores = [stack.enter_context(Store(tmp_path / f"n{i}")) for i in range(3)]
        nodes = [hub.node(nid(i + 1)) for i in range(3)]
        engines = [SwarmEngine(stores[0], nodes[0]), LyingEngine(stores[1], nodes[1]),
                   SwarmEngine(stores[2], nodes[2], SwarmConfig(pipeline=2))]
        for e, n in zip(engines, nodes, strict=True):
            await e.start()
            stack.push_async_callback(e.aclose)
            stack.push_async_callback(n.aclose)
        data = os.urandom(4 * 1024 * 1024)
        info = stores[0].add_bytes(data, LeaseId.new("seed"))
        stores[1].add_bytes(data, LeaseId.new("seed"))
        await asyncio.wait_for(engines[2].download(
            info.blob_id, len(data), info.piece_size, lambda: [n.node_id for n in nodes]), 20)
        assert stores[2].get_data(info.blob_id, LeaseId.new("c")) == data
        assert engines[2].pieces_rejected >= 1
        assert engines[2].banned[info.blob_id] == {nodes[1].node_id}


async def test_connection_limit_is_enforced(tmp_path: Path) -> None:
    seed_cfg = SwarmConfig(max_connections=1, stall_timeout=5)
    async with swarm(tmp_path, 4, source_config=seed_cfg) as peers:
        blob, data, piece_size = seed(peers[0], 1024 * 1024)
        everyone = [p.node_id for p in peers]
        await asyncio.wait_for(asyncio.gather(*(
            p.engine.download(blob, len(data), piece_size, lambda: everyone)
            for p in peers[1:])), 20)
        for p in peers[1:]:
            assert p.store.get_data(blob, LeaseId.new("c")) == data
        # the seed served one connection at a time and turned the others away; they got
        # the blob from each other
        assert peers[0].engine.connections_refused > 0


async def test_non_members_get_nothing(tmp_path: Path) -> None:
    hub = MemoryHub()
    async with AsyncExitStack() as stack:
        stores = [stack.enter_context(Store(tmp_path / f"n{i}")) for i in range(2)]
        nodes = [hub.node(nid(i + 1)) for i in range(2)]
        members = {nodes[0].node_id}  # the downloader is not a member of the seed's space
        engines = [SwarmEngine(stores[0], nodes[0], authorize=members.__contains__),
                   SwarmEngine(stores[1], nodes[1], SwarmConfig(stall_timeout=0.5))]
        for e, n in zip(engines, nodes, strict=True):
            await e.start()
            stack.push_async_callback(e.aclose)
            stack.push_async_callback(n.aclose)
        info = stores[0].add_bytes(os.urandom(1024 * 1024))
        with pytest.raises(TransferError):
            await engines[1].download(info.blob_id, info.size, info.piece_size,
                                      lambda: [nodes[0].node_id])
        assert engines[0].connections_refused >= 1
        assert engines[0].bytes_uploaded == 0


# --- hostile peers over the real TLS transport --------------------------------------------------


@asynccontextmanager
async def tls_swarm(tmp_path: Path, n: int, config: SwarmConfig, source_upload_rate: float
                    ) -> AsyncIterator[tuple[list[Peer], Endpoint]]:
    """``n`` engines and one more endpoint (for a hostile peer), all on loopback TLS."""
    async with AsyncExitStack() as stack:
        endpoints = [await Endpoint.start(Identity.generate()) for _ in range(n + 1)]
        for ep in endpoints:
            stack.push_async_callback(ep.aclose)
            for other in endpoints:
                if other is not ep:
                    ep.add_peer_addresses(other.node_id, other.ticket.addrs)
        peers = []
        for i, ep in enumerate(endpoints[:n]):
            store = stack.enter_context(Store(tmp_path / f"n{i}"))
            engine = SwarmEngine(store, ep, replace(config, upload_rate=source_upload_rate)
                                 if i == 0 else config)
            await engine.start()
            stack.push_async_callback(engine.aclose)
            peers.append(Peer(ep.node_id, store, engine))
        yield peers, endpoints[n]


# deadlines short enough that the hostile peer is found out during a 16 MiB download
HOSTILE = SwarmConfig(stall_timeout=30, request_timeout=0.3, send_timeout=2.0)


@pytest.mark.parametrize("mode", ["black-hole", "non-reader"])
async def test_a_hostile_peer_does_not_stall_the_others(tmp_path: Path, mode: str) -> None:
    # a slow source: the others keep asking the black hole (it claims to be a seed) for
    # pieces nobody else has yet, long enough for its deadlines to expire three times
    source_rate = 4 * MiB if mode == "black-hole" else 0
    async with tls_swarm(tmp_path, 4, HOSTILE, source_rate) as (peers, hostile_ep):
        blob, data, piece_size = seed(peers[0], 16 * MiB)
        hostile = HostilePeer(hostile_ep, mode)
        everyone = [hostile_ep.node_id, *(p.node_id for p in peers)]
        async with TaskOwner("test") as tasks:
            if mode == "non-reader":  # it asks the source first, before anybody else
                tasks.spawn(hostile.attack(peers[0].node_id, blob, len(data), piece_size),
                            name="attack")
                await eventually(lambda: peers[0].engine.connections == 1, 5)
            t0 = time.monotonic()
            said: set[str] = set()  # the reasons the targets' status gave
            await asyncio.wait_for(asyncio.gather(*(
                p.engine.download(blob, len(data), piece_size, lambda: everyone,
                                  progress=lambda jp: said.add(jp.reason))
                for p in peers[1:])), 28)
            elapsed = time.monotonic() - t0
        for p in peers[1:]:
            assert p.store.get_data(blob, LeaseId.new("c")) == data
        # before: a black hole held its requests until the 30 s stall timeout, a non-reader
        # blocked every upload worker of the source for good
        assert elapsed < 20, elapsed  # ~2 s on an idle machine
        if mode == "black-hole":
            assert hostile.requests > 0
            assert sum(p.engine.requests_expired for p in peers[1:]) > 0
            reasons = [p.engine.ban_reasons.get(blob, {}).get(hostile_ep.node_id, "")
                       for p in peers[1:]]
            assert any("answered none of its requests" in r for r in reasons), reasons
            assert sum(p.engine.bans[BanKind.UNRESPONSIVE] for p in peers[1:]) >= 1
            short = hostile_ep.node_id.short()
            assert any(f"last {short}: answered none" in r for r in said), said
        else:
            await eventually(lambda: hostile_ep.node_id in peers[0].engine.banned.get(blob, ()),
                             10)
            assert "does not read" in peers[0].engine.ban_reasons[blob][hostile_ep.node_id]
            assert peers[0].engine.bans[BanKind.NOT_READING] == 1


async def test_a_closed_connections_layer_request_is_reissued_at_once(tmp_path: Path) -> None:
    """The tail stall: two nodes dial each other, the tie-break closes the connection that
    carried the piece-layer request, and the job, remembering the peer instead of the
    connection, never asked again (30 s stall timeout)."""
    hub = MemoryHub()
    async with AsyncExitStack() as stack:
        src_store = stack.enter_context(Store(tmp_path / "src"))
        dst_store = stack.enter_context(Store(tmp_path / "dst"))
        nets = [hub.node(nid(i)) for i in (1, 2, 3)]  # source, the other target, us
        for net in nets:
            stack.push_async_callback(net.aclose)
        src = SwarmEngine(src_store, nets[0])
        dst = SwarmEngine(dst_store, nets[2], SwarmConfig(stall_timeout=30, request_timeout=30))
        for e in (src, dst):
            await e.start()
            stack.push_async_callback(e.aclose)
        blob, data, piece_size = seed(Peer(nets[0].node_id, src_store, src), 2 * MiB)
        raw_layer = src_store.piece_layer(blob).to_bytes()
        available = [nets[1].node_id]  # the source joins once the layer came from the other

        async def other_target(stream: Stream) -> None:
            # it holds the layer (no pieces yet); our dial reaches it and asks for the layer
            session = SwarmSession(blob, len(data), piece_size)
            session.receive(await stream.recv())
            await stream.send(session.hello(Bitfield(session.pieces), True, 1))
            while not isinstance(session.receive(await stream.recv()), LayerWanted):
                pass
            # ... while it dials us too: our id is larger, so both keep its connection
            back = await nets[1].open_stream(nets[2].node_id, PROTOCOL)
            s2 = SwarmSession(blob, len(data), piece_size)
            await back.send(s2.hello(Bitfield(s2.pieces), True, 1))
            s2.receive(await back.recv())
            while True:
                if isinstance(s2.receive(await back.recv()), LayerWanted):
                    await back.send(s2.layer(raw_layer))
                    available.append(nets[0].node_id)

        nets[1].set_handler(PROTOCOL, other_target)
        await asyncio.wait_for(dst.download(blob, len(data), piece_size, lambda: available), 10)
        assert dst_store.get_data(blob, LeaseId.new("c")) == data


async def test_many_concurrent_jobs_between_the_same_three_nodes_complete(tmp_path: Path) -> None:
    """Each node seeds some blobs and downloads all the others at once, over one TLS
    connection per pair: a reader that waited for its sends (the stream's credit) could not
    read the other side's requests, and two such peers waited on each other."""
    async with tls_swarm(tmp_path, 3, SwarmConfig(stall_timeout=20), 0) as (peers, _):
        blobs = [(i % 3, *seed(peers[i % 3], 3 * MiB + i)) for i in range(12)]
        everyone = [p.node_id for p in peers]
        await asyncio.wait_for(asyncio.gather(*(
            p.engine.download(blob, len(data), piece_size, lambda: everyone)
            for owner, blob, data, piece_size in blobs
            for k, p in enumerate(peers) if k != owner)), 60)
        for owner, blob, data, _ps in blobs:
            for k, p in enumerate(peers):
                if k != owner:
                    assert p.store.get_data(blob, LeaseId.new("c")) == data
        # 24 end games between the same peers: a piece crossing a cancel is taken or dropped,
        # never a reset (the issue saw 24-29 "unsolicited piece" resets per run)
        assert [p.engine.protocol_errors for p in peers] == [0, 0, 0]


async def test_piece_io_threads_run_calls_and_end() -> None:
    io = _PieceIo(2)
    main = threading.get_ident()
    assert await io.run(lambda a, b: (a + b, threading.get_ident() != main), 2, 3) == (5, True)
    results = await asyncio.gather(*(io.run(time.sleep, 0.05) for _ in range(4)))
    assert results == [None] * 4
    with pytest.raises(ZeroDivisionError):
        await io.run(lambda: 1 // 0)
    threads = list(io._threads)
    assert len(threads) == 2
    cancelled = io.run(time.sleep, 0.05)
    cancelled.cancel()
    io.close()
    for t in threads:
        await asyncio.to_thread(t.join, 5)
        assert not t.is_alive()


async def test_uploads_read_at_most_upload_workers_pieces_at_once(tmp_path: Path) -> None:
    source = SwarmConfig(upload_workers=2, stall_timeout=5)
    async with swarm(tmp_path, 3, source_config=source) as peers:
        blob, data, piece_size = seed(peers[0], 8 * MiB)
        engine = peers[0].engine
        run = engine.piece_io.run
        reading = most = 0

        def slowly(fn: Callable[..., Any], *args: Any) -> Any:
            time.sleep(0.002)  # long enough for requests to pile up behind the reads
            return fn(*args)

        def counted(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            nonlocal reading, most
            reading += 1
            most = max(most, reading)
            fut = run(slowly, fn, *args)

            def done(_: object) -> None:
                nonlocal reading
                reading -= 1

            fut.add_done_callback(done)
            return fut

        engine.piece_io.run = counted  # type: ignore[method-assign]
        only_source = [peers[0].node_id]
        await asyncio.wait_for(asyncio.gather(*(
            p.engine.download(blob, len(data), piece_size, lambda: only_source)
            for p in peers[1:])), 30)
        assert most == 2  # both workers busy at times, never a third read
        assert engine._reads == 0  # every read slot came back
        for p in peers[1:]:
            assert p.store.get_data(blob, LeaseId.new("check")) == data


async def test_piece_threads_are_no_more_than_cpus(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    # upload_workers reads may be in flight, but no more threads than CPUs run them
    monkeypatch.setattr(swarm_module, "usable_cpus", lambda: 2)
    assert swarm_module.piece_threads(4) == 2
    assert swarm_module.piece_threads(1) == 1
    async with swarm(tmp_path, 2, SwarmConfig(upload_workers=4, stall_timeout=5)) as peers:
        blob, data, piece_size = seed(peers[0], 4 * MiB)
        only_source = [peers[0].node_id]
        await asyncio.wait_for(peers[1].engine.download(blob, len(data), piece_size,
                                                        lambda: only_source), 30)
        assert peers[1].store.get_data(blob, LeaseId.new("check")) == data
        assert len(peers[0].engine.piece_io._threads) == 2
