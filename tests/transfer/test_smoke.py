from __future__ import annotations

import asyncio

from blobmesh.store import LeaseId
from blobmesh.transfer import Status, Voucher
from tests.transfer.conftest import Pair


async def test_pull_and_push(pair: Pair, blob_bytes: bytes) -> None:
    a = await pair.peer(1)
    b = await pair.peer(2)
    bid = a.store.add_bytes(blob_bytes, LeaseId.new("t")).blob_id
    chid = await b.mgr.open_pull(a.id, Voucher("any"), bid)
    st = await asyncio.wait_for(b.mgr.wait(chid), 10)
    assert st.status is Status.COMPLETED
    assert st.received == len(blob_bytes)
    assert b.store.get_data(bid, LeaseId.new("t")) == blob_bytes
    c = await pair.peer(3)
    chid = await b.mgr.open_push(c.id, Voucher("any"), bid)
    st = await asyncio.wait_for(b.mgr.wait(chid), 10)
    assert st.sent == len(blob_bytes)
    assert c.store.get_data(bid, LeaseId.new("t")) == blob_bytes
