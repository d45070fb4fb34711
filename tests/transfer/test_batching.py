"""Batched pulls over the in-memory network: many small blobs on one stream, verified and
group-committed; hostile responders, unknown ids, broken streams and killed responders."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest

from blobmesh.errors import (
    BadPeerDataError,
    BlobNotFoundError,
    ProtocolError,
    TransferError,
    VoucherRejectedError,
)
from blobmesh.hashing import BlobId, hash_bytes
from blobmesh.store import LeaseId, Store
from blobmesh.transfer import Voucher
from blobmesh.transfer import batch as bp
from blobmesh.transfer.batch import BATCH_PROTOCOL, MAX_BLOB, Blob, Skip
from blobmesh.transport.api import Stream
from tests.transfer.conftest import Pair, Peer, TapStream, add

ANY = Voucher("any")
LEASE = LeaseId.named("test")
T = 15


def small_blobs(store: Store, n: int, size: int = 16 * 1024) -> list[BlobId]:
    return [add(store, os.urandom(size)) for _ in range(n)]


def held(store: Store, ids: list[BlobId]) -> list[BlobId]:
    return [b for b in ids if store.has(b)]


async def test_many_small_blobs_and_a_large_one(pair: Pair) -> None:
    a, b = await pair.peer(1), await pair.peer(2)
    small = small_blobs(a.store, 600)
    large = add(a.store, os.urandom(MAX_BLOB + 1))
    here = small[:5]
    for blob_id in here:
        b.store.add_bytes(a.store.get_data(blob_id, LEASE))
    got = await asyncio.wait_for(b.mgr.pull_many(a.id, ANY, [*small, large, small[7]]), T)
    assert sorted(got) == sorted([*small[5:], large])
    for blob_id in [*small, large]:
        assert b.store.get_data(blob_id, LEASE, verify=True)
    # only the large blob took a channel; the small ones one stream and no channel rows
    assert [s.blob_id for s in b.mgr.in_progress_channels().values()] == []
    assert a.mgr.batches.blobs_served == 595


async def test_unknown_id_fails_clearly_and_keeps_the_rest(pair: Pair) -> None:
    a, b = await pair.peer(1), await pair.peer(2)
    known = small_blobs(a.store, 10)
    unknown = hash_bytes(b"nobody has this")
    with pytest.raises(BlobNotFoundError) as info:
        await asyncio.wait_for(b.mgr.pull_many(a.id, ANY, [*known[:4], unknown, *known[4:]]), T)
    assert info.value.context["blob_id"] == unknown
    assert held(b.store, known) == known
    assert not b.store.has(unknown)


async def test_rejected_by_the_validator(pair: Pair) -> None:
    a, b = await pair.peer(1), await pair.peer(2)
    blobs = small_blobs(a.store, 3)
    with pytest.raises(VoucherRejectedError):
        await asyncio.wait_for(b.mgr.pull_many(a.id, Voucher("unregistered"), blobs), T)
    assert held(b.store, blobs) == []


Answer = Callable[[bp.Want, int, bytes], list[bp.BatchMessage]]


def liar(peer: Peer, answer: Answer) -> None:
    """Serve the batch protocol on ``peer`` with ``answer(want, index, data)`` -> messages."""
    real = peer.store

    async def serve(stream: Stream) -> None:
        seq = 0
        while True:
            want, ids = bp.check_want(bp.decode(await stream.recv()), seq)
            seq += 1
            for i, blob_id in enumerate(ids):
                data = real.get_data(blob_id, LEASE)
                for msg in answer(want, i, data):
                    await stream.send(bp.encode(msg))

    peer.node.set_handler(BATCH_PROTOCOL, serve)


async def test_a_lying_responder_is_named_and_nothing_false_is_stored(pair: Pair) -> None:
    a, b = await pair.peer(1), await pair.peer(2)
    blobs = small_blobs(a.store, 40)

    def answer(want: bp.Want, i: int, data: bytes) -> list[bp.BatchMessage]:
        if i == 17:
            data = bytes([data[0] ^ 1]) + data[1:]
        return [Blob(want.batch, i, memoryview(data))]

    liar(a, answer)
    with pytest.raises(BadPeerDataError) as info:
        await asyncio.wait_for(b.mgr.pull_many(a.id, ANY, blobs), T)
    assert info.value.context["peer"] == a.id
    assert info.value.context["blob_id"] == blobs[17]
    stored = held(b.store, blobs)
    assert blobs[17] not in stored
    assert blobs[:17] == stored[:17]  # everything that verified before the lie is kept
    for blob_id in stored:
        b.store.get_data(blob_id, LEASE, verify=True)


@pytest.mark.parametrize("lie", ["wrong slot", "twice", "oversized", "bad code"])
async def test_protocol_lies_fail_with_a_protocol_error(pair: Pair, lie: str) -> None:
    a, b = await pair.peer(1), await pair.peer(2)
    blobs = small_blobs(a.store, 6)

    def answer(want: bp.Want, i: int, data: bytes) -> list[bp.BatchMessage]:
        ok: list[bp.BatchMessage] = [Blob(want.batch, i, memoryview(data))]
        if i != 3:
            return ok
        lies: dict[str, list[bp.BatchMessage]] = {
                "wrong slot": [Blob(want.batch, i + 1, memoryview(data))],
                "twice": ok + ok,
                "oversized": [Blob(want.batch, i, memoryview(bytes(MAX_BLOB + 1)))],
                "bad code": [Skip(want.batch, i, "later")]}
        return lies[lie]

    liar(a, answer)
    with pytest.raises(ProtocolError):
        await asyncio.wait_for(b.mgr.pull_many(a.id, ANY, blobs), T)
    stored = held(b.store, blobs)
    assert set(stored) <= set(blobs[:4])  # nothing after the lie
    for blob_id in stored:
        b.store.get_data(blob_id, LEASE, verify=True)


async def test_a_reset_stream_resumes_with_what_is_missing(pair: Pair) -> None:
    a, b = await pair.peer(1), await pair.peer(2)
    blobs = small_blobs(a.store, 300)
    sent = 0

    async def hook(stream: TapStream, msg: bp.BatchMessage) -> None:
        nonlocal sent
        if isinstance(msg, Blob):
            sent += 1
            if sent == 100:
                stream.reset("cut")

    a.tap.batch_hook = hook
    got = await asyncio.wait_for(b.mgr.pull_many(a.id, ANY, blobs), T)
    assert sorted(got) == sorted(blobs)
    assert held(b.store, blobs) == blobs
    assert sent < 300 + 2 * bp.MAX_IDS  # at most the wants in flight are sent again


async def test_a_killed_responder_fails_clearly_then_a_rerun_completes(pair: Pair) -> None:
    a, b = await pair.peer(1), await pair.peer(2)
    blobs = small_blobs(a.store, 400)
    sent = 0
    killed = asyncio.Event()

    async def hook(stream: TapStream, msg: bp.BatchMessage) -> None:
        nonlocal sent
        if isinstance(msg, Blob):
            sent += 1
            if sent == 150:
                killed.set()
                await asyncio.sleep(T)  # the process dies with this message unsent

    a.tap.batch_hook = hook
    pull = asyncio.create_task(b.mgr.pull_many(a.id, ANY, blobs))
    await asyncio.wait_for(killed.wait(), T)
    await pair.stop(a)
    with pytest.raises(TransferError, match="broke off"):
        await asyncio.wait_for(pull, T)
    first = held(b.store, blobs)
    assert first == blobs[: len(first)] and 0 < len(first) < 400
    del pair.hub.nodes[a.id]  # a dead process's node serves nothing: a new one comes up
    a = await pair.peer(1)  # on the same home
    got = await asyncio.wait_for(b.mgr.pull_many(a.id, ANY, blobs), T)
    assert sorted(got) == sorted(blobs[len(first):])
    assert a.mgr.batches.blobs_served == 400 - len(first)
    assert held(b.store, blobs) == blobs


async def test_unadmitted_peers_are_refused(pair: Pair) -> None:
    a = await pair.peer(1)
    b = await pair.peer(2)
    a.mgr.batches._admit = lambda peer: False
    blobs = small_blobs(a.store, 2)
    with pytest.raises(ProtocolError, match="not admitted"):
        await asyncio.wait_for(b.mgr.pull_many(a.id, ANY, blobs), T)
    assert a.mgr.batches.refused_unadmitted == 1
