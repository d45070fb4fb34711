"""Forged dist/* ops against in-process nodes on the real TLS transport.

An admitted but hostile member (a raw client that knows the space secret) pushes ops that the
authorization rules must refuse on every node: ops by a key that was never admitted, a request
naming another node as source, a status of another node, a cancel by a non-source.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path

import msgspec
import pytest

from blobmesh.distribution.model import DistributionHandle, DistributionState, Priority
from blobmesh.distribution.service import (
    OP_CANCEL,
    OP_REQUEST,
    OP_SUMMARY,
    CancelOp,
    DistributionConfig,
    RequestOp,
    SummaryOp,
    SummaryTarget,
)
from blobmesh.distribution.swarm import SwarmConfig
from blobmesh.errors import NotAuthorizedError
from blobmesh.hashing import BlobId
from blobmesh.node.daemon import Node, NodeConfig
from blobmesh.space import Limits, wire
from blobmesh.space.records import sign_op
from blobmesh.transport import Endpoint, Identity
from tests.space.util import FAST, RawPeer
from tests.util import eventually, running_nodes

MiB = 1024 * 1024
SLOW = SwarmConfig(upload_rate=512 * 1024)  # 4 MiB take ~8 s: the distribution stays active


@asynccontextmanager
async def fleet(tmp_path: Path, n: int, *, configs: dict[int, NodeConfig] | None = None
                ) -> AsyncIterator[list[Node]]:
    cfgs = [(configs or {}).get(i) or NodeConfig(home=tmp_path / f"n{i}") for i in range(n)]
    cfgs[0] = replace(cfgs[0], swarm=SLOW)
    async with running_nodes(cfgs) as nodes:
        yield nodes


def op(author: Identity, kind: str, payload: msgspec.Struct) -> bytes:
    return sign_op(author, space="blobmesh", kind=kind, timestamp=int(time.time() * 1000),
                   payload=msgspec.msgpack.encode(payload), limits=Limits()).raw


async def hostile_member(tmp_path: Path, stack: AsyncExitStack, node: Node) -> RawPeer:
    """A member over TLS: it knows the secret (from the ticket) and holds a record."""
    ident = Identity.generate()
    ep = await stack.enter_async_context(await Endpoint.start(ident))
    ep.add_peer_addresses(node.identity.node_id, node.ticket.addrs)
    raw = RawPeer(None, node.space.config, network=ep, identity=ident)
    assert isinstance(await raw.connect(node.identity.node_id), wire.Welcome)
    await raw.join()
    await eventually(lambda: node.space.is_member(ident.node_id), 5)
    return raw


def request_of(source: Identity, handle: str, blob: bytes) -> RequestOp:
    return RequestOp(handle, blob, MiB, 256 * 1024, "all", int(Priority.CRITICAL),
                     source.node_id.digest, time.time())


def forged_summary(handle: DistributionHandle, victim: Identity) -> SummaryOp:
    return SummaryOp(str(handle), "finished-with-failures", 1, 0, 1, time.time(),
                     [SummaryTarget(victim.node_id.digest, "failed", 0, "forged")])


async def test_forged_ops_are_refused_on_every_node(tmp_path: Path) -> None:
    configs = {2: NodeConfig(home=tmp_path / "n2")}
    async with fleet(tmp_path, 3, configs=configs) as (a, b, c), AsyncExitStack() as stack:
        blob = a.store.add_bytes(os.urandom(4 * MiB)).blob_id
        handle = await a.distribution.distribute(blob, "all", Priority.NORMAL)
        await eventually(lambda: all(n.distribution.distributions() for n in (b, c)), 10)
        hostile = await hostile_member(tmp_path, stack, a)
        me = hostile.identity
        outsider = Identity.generate()  # never admitted
        forged = [
            # a critical request from a key that is no member (the probe)
            op(outsider, OP_REQUEST, request_of(outsider, "d-outsider", os.urandom(32))),
            # a member's request naming another node as its source
            op(me, OP_REQUEST, RequestOp("d-framed", os.urandom(32), MiB, 256 * 1024, "all",
                                         3, a.identity.node_id.digest, time.time())),
            # fake targets and fake failures in someone else's distribution: a summary by a
            # key that is no member, and by a member that is not the source
            op(outsider, OP_SUMMARY, forged_summary(handle, outsider)),
            op(me, OP_SUMMARY, forged_summary(handle, me)),
            # a cancel by a member that is not the source
            op(me, OP_CANCEL, CancelOp(str(handle))),
            # a cancel by a key that is no member
            op(outsider, OP_CANCEL, CancelOp(str(handle))),
        ]
        answer = await hostile.request(wire.PushOps(0, forged, True))
        assert isinstance(answer, wire.Ack)
        assert a.space.metrics["ops_rejected_non_member"] == 3
        assert a.space.metrics["ops_rejected"] == 6
        with pytest.raises(NotAuthorizedError, match="only the source"):
            await b.distribution.cancel(handle)
        await asyncio.sleep(0.5)  # several gossip rounds
        forged_ids = {msgspec.msgpack.decode(raw)[0] for raw in forged}
        for n in (a, b, c):
            held = {o.raw for kind in (OP_REQUEST, OP_SUMMARY, OP_CANCEL)
                    for o in n.space.stored_ops(kind)}
            assert not {msgspec.msgpack.decode(r)[0] for r in held} & forged_ids
            (status,) = n.distribution.distributions()
            assert status.handle == handle and status.state is DistributionState.ACTIVE
            # the hostile member is in scope "all" itself; the outsider is nobody
            assert {t.node for t in status.targets} <= {b.identity.node_id, c.identity.node_id,
                                                        me.node_id}
            assert all(t.reason != "forged" for t in status.targets)


async def test_distributor_allowlist(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        a = Node(NodeConfig(home=tmp_path / "a", timing=FAST))
        await a.start()
        stack.push_async_callback(a.aclose)
        picky = Node(NodeConfig(home=tmp_path / "p", timing=FAST, bootstrap=(a.ticket,),
                                distribution=DistributionConfig(
                                    distributors=frozenset({a.identity.node_id}))))
        await picky.start()
        stack.push_async_callback(picky.aclose)
        await eventually(lambda: bool(picky.space.peers()), 10)
        hostile = await hostile_member(tmp_path, stack, a)
        theirs = op(hostile.identity, OP_REQUEST,
                    request_of(hostile.identity, "d-member", os.urandom(32)))
        assert isinstance(await hostile.request(wire.PushOps(0, [theirs], True)), wire.Ack)
        await eventually(lambda: [s.handle for s in a.distribution.distributions()] ==
                         [DistributionHandle("d-member")], 5)  # a member may distribute...
        await asyncio.sleep(0.5)
        assert picky.distribution.distributions() == []  # ...unless distributors are listed
        assert picky.space.stored_ops(OP_REQUEST) == []


async def test_the_source_cancel_holds_on_every_node_and_across_restarts(
        tmp_path: Path) -> None:
    async with fleet(tmp_path, 3) as nodes:
        a, b, c = nodes
        blob = a.store.add_bytes(os.urandom(4 * MiB)).blob_id
        handle = await a.distribution.distribute(blob, "all", Priority.NORMAL)
        await eventually(lambda: all(n.distribution.distributions() for n in (b, c)), 10)
        await a.distribution.cancel(handle)

        def cancelled(n: Node) -> bool:
            return [s.state for s in n.distribution.distributions()] == \
                [DistributionState.CANCELLED]

        await eventually(lambda: all(cancelled(n) for n in nodes), 10)
        await b.aclose(leave=False)
        b2 = Node(replace(b.config, bootstrap=(a.ticket,)))
        await b2.start()
        try:
            assert cancelled(b2)  # from its own op store, before hearing from anyone
            before = present(b2, blob)
            await asyncio.sleep(1.0)
            assert cancelled(b2)
            assert present(b2, blob) == before  # no download restarted
        finally:
            await b2.aclose()


def present(node: Node, blob: BlobId) -> int:
    return next((b.pieces_present for b in node.store.blobs() if b.blob_id == blob), 0)
