"""Strangers and refused requests cost a constant: no channel row, no table entry (real TLS)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from blobmesh.store import Store
from blobmesh.transfer import AcceptAll, TransferManager, Voucher
from blobmesh.transfer.messages import PROTOCOL, Error, Request, Response, decode, encode
from blobmesh.transport import Endpoint, Identity, NodeId
from tests.transfer.conftest import fast_config
from tests.util import eventually

MiB = 1024 * 1024


@dataclass
class Responder:
    endpoint: Endpoint
    store: Store
    mgr: TransferManager
    admitted: set[NodeId]

    def rows(self) -> int:
        with sqlite3.connect(self.store.home / "transfer.sqlite") as db:
            count: int = db.execute("SELECT count(*) FROM channels").fetchone()[0]
        return count

    def db_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.store.home.glob("transfer.sqlite*"))


@asynccontextmanager
async def responder(tmp_path: Path, **config: object) -> AsyncIterator[Responder]:
    async with AsyncExitStack() as stack:
        ep = await stack.enter_async_context(await Endpoint.start(Identity.generate()))
        store = stack.enter_context(Store(tmp_path / "responder"))
        admitted: set[NodeId] = set()
        mgr = TransferManager(ep, store, config=fast_config(**config),
                              admit=admitted.__contains__)
        mgr.register_voucher_type("pull-only", AcceptAll(push=False, pull=True))
        await mgr.start()
        stack.push_async_callback(mgr.aclose)
        yield Responder(ep, store, mgr, admitted)


async def request(client: Endpoint, to: NodeId, req: Request) -> Error | Response:
    stream = await client.open_stream(to, PROTOCOL)
    await stream.send(encode(req))
    answer = decode(await stream.recv())
    stream.reset("done")
    assert isinstance(answer, Error | Response)
    return answer


async def test_stranger_flood_keeps_no_rows(tmp_path: Path) -> None:
    async with responder(tmp_path) as r, await Endpoint.start(Identity.generate()) as stranger:
        stranger.add_peer_addresses(r.endpoint.node_id, r.endpoint.ticket.addrs)
        before = r.db_bytes()
        voucher = os.urandom(MiB)  # the probe: 200 requests, 1 MiB vouchers

        async def one(i: int) -> Error | Response:
            return await request(stranger, r.endpoint.node_id,
                                 Request(i, True, os.urandom(32), "pull-only", voucher))

        answers = []
        for batch in range(10):
            answers += await asyncio.gather(*(one(batch * 20 + i) for i in range(20)))
        assert all(isinstance(a, Error) and "not admitted" in a.message for a in answers)
        assert r.mgr.refused_unadmitted == 200
        assert r.rows() == 0 and r.mgr.in_progress_channels() == {}
        assert r.db_bytes() - before < MiB  # was +342 MiB: one voucher stored per request


async def test_refused_requests_of_an_admitted_peer_keep_no_rows(tmp_path: Path) -> None:
    async with responder(tmp_path) as r, await Endpoint.start(Identity.generate()) as member:
        member.add_peer_addresses(r.endpoint.node_id, r.endpoint.ticket.addrs)
        r.admitted.add(member.node_id)
        voucher = os.urandom(MiB)
        for i in range(10):  # malformed: a push without its piece layer
            answer = await request(member, r.endpoint.node_id,
                                   Request(i, False, os.urandom(32), "pull-only", voucher))
            assert isinstance(answer, Error)
        blob = r.store.add_bytes(os.urandom(300_000)).blob_id
        for i in range(10, 40):  # an unknown voucher type, then pulls of blobs not here
            kind = "unknown" if i < 20 else "pull-only"
            answer = await request(member, r.endpoint.node_id,
                                   Request(i, True, os.urandom(32), kind, voucher))
            assert isinstance(answer, Response) and not answer.accepted
        assert r.rows() == 0 and r.mgr.in_progress_channels() == {}
        assert r.mgr.requests_refused == 30
        answer = await request(member, r.endpoint.node_id,
                               Request(99, True, blob.digest, "pull-only", b""))
        assert isinstance(answer, Response) and answer.accepted
        await eventually(lambda: r.rows() == 1, 5)  # an accepted channel is kept


async def test_finished_channels_are_pruned_after_the_retention(tmp_path: Path) -> None:
    async with responder(tmp_path, retention=0.5) as r, \
            await Endpoint.start(Identity.generate()) as member:
        member.add_peer_addresses(r.endpoint.node_id, r.endpoint.ticket.addrs)
        r.admitted.add(member.node_id)
        blob = r.store.add_bytes(os.urandom(300_000)).blob_id
        with Store(tmp_path / "member") as store:
            async with TransferManager(member, store, config=fast_config()) as client:
                for _ in range(3):
                    chid = await client.open_pull(r.endpoint.node_id,
                                                  Voucher("pull-only", b""), blob)
                    await client.wait(chid)
        # and one the initiator abandons right after it was accepted
        stream = await member.open_stream(r.endpoint.node_id, PROTOCOL)
        await stream.send(encode(Request(7, True, blob.digest, "pull-only", b"")))
        answer = decode(await stream.recv())
        assert isinstance(answer, Response) and answer.accepted
        stream.reset("gone")
        await eventually(lambda: r.rows() == 4, 5)
        await eventually(lambda: r.rows() == 0 and r.mgr.channels_pruned == 4, 10)
        assert r.mgr.in_progress_channels() == {}

