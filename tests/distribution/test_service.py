"""The distribution service over in-memory networks with real spaces and swarms."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from blobmesh.distribution.model import (
    SOURCES_REPORTED,
    DistributionHandle,
    DistributionState,
    Priority,
    ScopeError,
    TargetState,
)
from blobmesh.distribution.service import (
    NOTIFY_PROGRESS,
    OP_SUMMARY,
    DistributionConfig,
    DistributionService,
    DistributionTimeoutError,
    ProgressNote,
    SummaryOp,
    UnknownDistributionError,
)
from blobmesh.distribution.swarm import SwarmConfig, SwarmEngine
from blobmesh.errors import BlobNotFoundError, CorruptBlobError
from blobmesh.hashing import BlobId
from blobmesh.space import Seed, Space, SpaceConfig
from blobmesh.store import LeaseId, Store
from blobmesh.tasks import failure_counts
from blobmesh.transport.identity import Identity, NodeId
from blobmesh.transport.memory import MemoryHub
from tests.space.util import FAST
from tests.util import eventually, flip_byte, needs_root, tmpfs

MiB = 1024 * 1024


@dataclass
class Member:
    store: Store
    space: Space
    swarm: SwarmEngine
    dist: DistributionService


@asynccontextmanager
async def cluster(tmp_path: Path, groups: list[list[str]],
                  swarm_configs: dict[int, SwarmConfig] | None = None,
                  store_homes: dict[int, Path] | None = None,
                  authorize: dict[int, Callable[[NodeId], bool]] | None = None,
                  dist_configs: dict[int, DistributionConfig] | None = None
                  ) -> AsyncIterator[list[Member]]:
    hub = MemoryHub()
    members: list[Member] = []
    async with AsyncExitStack() as stack:
        first: Identity | None = None
        for i, g in enumerate(groups):
            ident = Identity.generate()
            net = hub.node(ident.node_id)
            seeds = (Seed(first.node_id),) if first else ()
            first = first or ident
            store = stack.enter_context(Store((store_homes or {}).get(i, tmp_path / f"n{i}")))
            space = Space(SpaceConfig(name="t", groups=tuple(g), seeds=seeds, timing=FAST),
                          ident, net, tmp_path / f"n{i}" / "space.sqlite")
            swarm = SwarmEngine(store, net, (swarm_configs or {}).get(i, SwarmConfig()),
                                authorize=(authorize or {}).get(i))
            dist = DistributionService(space, swarm, (dist_configs or {}).get(i))
            await space.start()
            await swarm.start()
            await space.join()
            await dist.start()
            stack.push_async_callback(space.aclose)
            stack.push_async_callback(swarm.aclose)
            stack.push_async_callback(dist.aclose)
            stack.push_async_callback(net.aclose)
            members.append(Member(store, space, swarm, dist))
        await eventually(lambda: all(len(m.space.peers()) == len(members) - 1
                                     for m in members), 10)
        yield members


def add(member: Member, size: int) -> BlobId:
    return member.store.add_bytes(os.urandom(size)).blob_id


async def test_wait_and_many_progress_subscribers(tmp_path: Path) -> None:
    async with cluster(tmp_path, [[], ["g"], ["g"]]) as (src, a, b):
        blob = add(src, 4 * MiB)
        handle = await src.dist.distribute(blob, "group:g", "high")

        async def collect() -> list[tuple[DistributionState, int]]:
            return [(s.state, s.bytes_done) async for s in src.dist.subscribe_progress(handle)]

        subs = [asyncio.create_task(collect()) for _ in range(3)]
        final = await src.dist.wait_for_completion(handle, 20)
        assert final.state is DistributionState.COMPLETED
        assert {t.node for t in final.targets} == {a.space.node_id, b.space.node_id}
        assert final.bytes_done == final.bytes_total == 8 * MiB
        for seen in await asyncio.gather(*subs):
            assert seen[-1] == (DistributionState.COMPLETED, 8 * MiB)
            done = [d for _, d in seen]
            assert done == sorted(done)  # progress never goes backwards
        assert a.store.has(blob) and b.store.has(blob)
        # cancelling after completion rolls nothing back
        after = await src.dist.cancel(handle)
        assert all(t.state is TargetState.COMPLETED for t in after.targets)
        assert a.store.has(blob)


async def test_progress_reports_the_targets_swarm_peers(tmp_path: Path) -> None:
    slow = {i: SwarmConfig(download_rate=4 * MiB) for i in (1, 2)}
    async with cluster(tmp_path, [[], [], []], slow) as (src, *_):
        handle = await src.dist.distribute(add(src, 16 * MiB), "all")

        async def both_peers_seen() -> bool:
            targets = (await src.dist.status(handle)).targets
            return all(t.state is TargetState.TRANSFERRING and t.peers == 2 for t in targets)

        await eventually(both_peers_seen, 10)  # the source and the other target
        await src.dist.cancel(handle)


async def test_progress_names_the_peers_a_target_receives_from(tmp_path: Path) -> None:
    slow = {i: SwarmConfig(download_rate=4 * MiB) for i in (1, 2)}
    async with cluster(tmp_path, [[], [], []], slow) as (src, a, b):
        handle = await src.dist.distribute(add(src, 16 * MiB), "all")
        ids = {m.space.node_id for m in (src, a, b)}

        async def sources_named() -> bool:
            targets = (await src.dist.status(handle)).targets
            return all(t.sources and src.space.node_id in t.sources for t in targets)

        await eventually(sources_named, 10)
        for t in (await src.dist.status(handle)).targets:
            assert set(t.sources) <= ids - {t.node} and len(t.sources) <= SOURCES_REPORTED

        async def rated() -> bool:  # each source with what it sends, about the target's rate
            targets = (await src.dist.status(handle)).targets
            return all(len(t.source_rates) == len(t.sources) and t.rate > 0 and
                       0 < sum(t.source_rates) <= 1.5 * t.rate for t in targets)

        await eventually(rated, 10)
        # a note naming more sources than allowed, or a malformed id, is dropped whole (were
        # one taken, the target would stay failed: a final state)
        for sources in ([bytes(32)] * (SOURCES_REPORTED + 1), [b"short"]):
            note = ProgressNote(str(handle), "failed", 1, 1.0, 1, "evil", sources)
            await a.space.send_notify(src.space.node_id,
                                      NOTIFY_PROGRESS + msgspec.msgpack.encode(note))
        # ... and so is one whose rates do not pair with its sources, or a negative rate
        for rates in ([1.0, 2.0], [-1.0]):
            raw = [str(handle), "failed", 1, 1.0, 1, "evil", [bytes(32)], rates]
            await a.space.send_notify(src.space.node_id,
                                      NOTIFY_PROGRESS + msgspec.msgpack.encode(raw))
        await asyncio.sleep(0.3)
        after = (await src.dist.status(handle)).target(a.space.node_id)
        assert after is not None and after.state is TargetState.TRANSFERRING
        await src.dist.cancel(handle)


async def test_the_source_takes_notes_only_from_targets_in_the_scope(tmp_path: Path) -> None:
    async with cluster(tmp_path, [[], ["g"], []]) as (src, a, outsider):
        handle = await src.dist.distribute(add(src, 2 * MiB), "group:g")
        note = ProgressNote(str(handle), "failed", 0, 0.0, 0, "forged by a non-target")
        await outsider.space.send_notify(src.space.node_id,
                                         NOTIFY_PROGRESS + msgspec.msgpack.encode(note))
        final = await src.dist.wait_for_completion(handle, 20)
        assert final.state is DistributionState.COMPLETED
        assert [t.node for t in final.targets] == [a.space.node_id]


def test_progress_notes_decode_across_versions() -> None:
    class OldNote(msgspec.Struct, array_like=True):  # a node from before ``sources``
        handle: str
        state: str
        bytes_done: int
        rate: float
        peers: int = 0
        reason: str = ""

    old = msgspec.msgpack.encode(OldNote("d-1", "transferring", 5, 1.0, 2, "r"))
    assert msgspec.msgpack.decode(old, type=ProgressNote).sources == []
    new = msgspec.msgpack.encode(ProgressNote("d-1", "transferring", 5, 1.0, 2, "r", [bytes(32)]))
    assert msgspec.msgpack.decode(new, type=OldNote) == OldNote("d-1", "transferring", 5, 1.0,
                                                                 2, "r")
    rated = msgspec.msgpack.encode(ProgressNote("d-1", "transferring", 5, 1.0, 2, "r",
                                                [bytes(32)], [3.0]))
    assert msgspec.msgpack.decode(rated, type=OldNote) == OldNote("d-1", "transferring", 5,
                                                                   1.0, 2, "r")
    assert msgspec.msgpack.decode(new, type=ProgressNote).source_rates == []


async def test_wait_timeout_carries_status(tmp_path: Path) -> None:
    slow = {1: SwarmConfig(download_rate=2 * MiB)}
    async with cluster(tmp_path, [[], []], slow) as (src, dst):
        blob = add(src, 16 * MiB)
        handle = await src.dist.distribute(blob, "all", Priority.LOW)
        with pytest.raises(DistributionTimeoutError) as err:
            await src.dist.wait_for_completion(handle, 0.5)
        assert err.value.status.state is DistributionState.ACTIVE
        assert err.value.status.targets[0].node == dst.space.node_id
        cancelled = await src.dist.cancel(handle)
        assert cancelled.state is DistributionState.CANCELLED
        await eventually(lambda: not dst.swarm.downloading(), 5)  # the target stopped its download
        assert not dst.store.has(blob)


async def test_errors(tmp_path: Path) -> None:
    async with cluster(tmp_path, [[], ["g"]]) as (src, _):
        with pytest.raises(BlobNotFoundError):
            await src.dist.distribute(BlobId(b"\1" * 32), "all")
        blob = add(src, MiB)
        with pytest.raises(ScopeError, match="matches scope group:none"):
            await src.dist.distribute(blob, "group:none")
        with pytest.raises(ScopeError, match="does not know"):
            await src.dist.distribute(blob, "node:nd1" + "a" * 52)
        with pytest.raises(ScopeError, match="in capability predicate"):
            await src.dist.distribute(blob, "cap:gpu==")
        with pytest.raises(UnknownDistributionError):
            await src.dist.status(DistributionHandle.new())


async def test_malformed_distribution_ops_are_rejected(tmp_path: Path) -> None:
    from blobmesh.errors import InvalidOpError

    async with cluster(tmp_path, [[], []]) as (src, dst):
        with pytest.raises(InvalidOpError):
            await src.space.publish("dist/request", b"\x93garbage")
        assert dst.dist.distributions() == []


@needs_root
async def test_disk_full_target_waits_says_so_once_and_resumes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # the target's store on a small disk of its own (its space database is elsewhere)
    with tmpfs(tmp_path / "n1-store", 24) as home:
        filler = home / "filler"
        async with cluster(tmp_path, [[], []], store_homes={1: home}) as (src, dst):
            free = shutil.disk_usage(filler.parent).free
            filler.write_bytes(b"\0" * (free - 6 * MiB))  # room for about 6 of the 16 MiB
            failures = dict(failure_counts())
            blob = add(src, 16 * MiB)
            handle = await src.dist.distribute(blob, "all")

            async def target_waits_for_disk() -> bool:
                t = (await src.dist.status(handle)).targets[0]
                return t.state is TargetState.WAITING_DISK and t.reason == "disk full"

            # before: "transferring" for minutes, a traceback flood, StoreFullError escaping
            await eventually(target_waits_for_disk, 20)
            # its verified pieces are kept (made durable while it waits)
            await eventually(lambda: dst.store.info(blob).pieces_present > 0, 5)
            filler.unlink()
            final = await src.dist.wait_for_completion(handle, 30)
            assert final.state is DistributionState.COMPLETED
            assert dst.store.get_data(blob, LeaseId.new("t")) == src.store.get_data(
                blob, LeaseId.new("t"))
            assert failure_counts() == failures  # no task died of it
    full_lines = [r for r in caplog.records if "disk full" in r.getMessage()]
    assert len(full_lines) == 1, [r.getMessage() for r in full_lines]
    assert not any(r.exc_info for r in caplog.records if r.levelno >= logging.WARNING)


def corrupt(store: Store, blob: BlobId, offset: int) -> None:
    flip_byte(store.layout.data_path(blob), offset)


async def test_distribute_refuses_and_quarantines_a_corrupt_blob(tmp_path: Path) -> None:
    async with cluster(tmp_path, [[], []]) as (src, _):
        blob = add(src, 4 * MiB)
        corrupt(src.store, blob, 3 * MiB)
        # before: accepted; its targets stalled at 63/64 pieces with "no progress"
        with pytest.raises(CorruptBlobError, match="quarantined"):
            await src.dist.distribute(blob, "all")
        assert not src.store.has(blob) and src.dist.distributions() == []


async def test_a_copy_that_rots_after_a_remembered_verification_is_still_refused(
        tmp_path: Path) -> None:
    async with cluster(tmp_path, [[], []]) as (src, _):
        blob = add(src, 4 * MiB)
        first = await src.dist.distribute(blob, "all")  # verified without a full rehash
        assert (await src.dist.wait_for_completion(first, 20)).state is \
            DistributionState.COMPLETED
        corrupt(src.store, blob, MiB)
        with pytest.raises(CorruptBlobError, match="quarantined"):
            await src.dist.distribute(blob, "all")
        assert not src.store.has(blob)


async def test_a_source_copy_that_rots_while_served_fails_the_distribution(
        tmp_path: Path) -> None:
    slow = {1: SwarmConfig(download_rate=2 * MiB, stall_timeout=30)}
    async with cluster(tmp_path, [[], []], slow) as (src, dst):
        blob = add(src, 8 * MiB)
        handle = await src.dist.distribute(blob, "all")
        corrupt(src.store, blob, 8 * MiB - 100)  # the last piece rots after the check
        # reported on the source, and quarantined: nobody is sent rotten data
        await eventually(lambda: blob in src.swarm.corrupt and not src.store.has(blob), 20)
        final = await src.dist.wait_for_completion(handle, 20)
        assert final.state is DistributionState.FINISHED_WITH_FAILURES
        assert "source's copy is corrupt" in final.targets[0].reason
        assert not dst.store.has(blob)


async def test_a_target_with_a_corrupt_copy_does_not_count_as_completed(tmp_path: Path) -> None:
    async with cluster(tmp_path, [[], []]) as (src, dst):
        data = os.urandom(4 * MiB)
        blob = src.store.add_bytes(data).blob_id
        dst.store.add_bytes(data)
        corrupt(dst.store, blob, MiB)
        handle = await src.dist.distribute(blob, "all")
        final = await src.dist.wait_for_completion(handle, 20)
        assert final.state is DistributionState.COMPLETED
        # before: the rotten copy counted as completed; now it was replaced by a good one
        assert dst.store.get_data(blob, LeaseId.new("t"), verify=True) == data
        assert blob in dst.swarm.corrupt


async def test_a_failed_attempt_is_retrying_never_a_final_state(tmp_path: Path) -> None:
    """Before: under load a healthy distribution briefly showed the terminal state
    finished-with-failures, then completed.  A target whose attempt fails (here: the source
    refuses its connections for a while) says it is retrying, and why; the distribution
    stays active and completes once the source serves."""
    serving = False
    quick = {1: SwarmConfig(stall_timeout=0.5)}
    async with cluster(tmp_path, [[], []], quick, authorize={0: lambda _peer: serving},
                       dist_configs={1: DistributionConfig(retry_backoff=0.2,
                                                           retry_backoff_max=0.5)}
                       ) as (src, dst):
        handle = await src.dist.distribute(add(src, 2 * MiB), "all")
        seen: list[tuple[DistributionState, TargetState, str]] = []

        async def collect() -> None:
            async for s in src.dist.subscribe_progress(handle, interval=0.02):
                seen.extend((s.state, t.state, t.reason) for t in s.targets)

        watch = asyncio.create_task(collect())

        async def retrying() -> bool:
            t = (await src.dist.status(handle)).targets[0]
            return t.state is TargetState.RETRYING and "retrying in" in t.reason

        await eventually(retrying, 10)
        await asyncio.sleep(1.0)  # a few failed attempts more
        assert src.swarm.connections_refused >= 2
        serving = True
        final = await src.dist.wait_for_completion(handle, 20)
        await asyncio.wait_for(watch, 5)
        assert final.state is DistributionState.COMPLETED
        assert dst.store.has(final.blob_id)
        assert any(t is TargetState.RETRYING for _, t, _ in seen)
        ended = [(d, t) for d, t, _ in seen if d is not DistributionState.ACTIVE or t.final]
        assert all(d is DistributionState.COMPLETED and t is TargetState.COMPLETED
                   for d, t in ended), ended


async def test_a_queued_target_says_why(tmp_path: Path) -> None:
    slow = {1: SwarmConfig(download_rate=4 * MiB, stall_timeout=30)}
    async with cluster(tmp_path, [[], []], slow) as (src, dst):
        low = await src.dist.distribute(add(src, 16 * MiB), "all", "low")
        await eventually(lambda: dst.swarm.downloading() != [], 10)
        high = await src.dist.distribute(add(src, 8 * MiB), "all", "critical")

        async def low_is_queued() -> bool:
            t = (await src.dist.status(low)).targets[0]
            return t.state is TargetState.QUEUED and "higher-priority" in t.reason

        await eventually(low_is_queued, 10)
        assert (await src.dist.wait_for_completion(high, 20)).state is \
            DistributionState.COMPLETED
        assert (await src.dist.wait_for_completion(low, 30)).state is \
            DistributionState.COMPLETED


async def test_targets_publish_no_ops_and_a_restarted_source_knows_them_from_one_summary(
        tmp_path: Path) -> None:
    async with cluster(tmp_path, [[], ["g"], ["g"]]) as (src, a, b):
        blob = add(src, 2 * MiB)
        handle = await src.dist.distribute(blob, "group:g")
        await src.dist.wait_for_completion(handle, 20)

        def summaries(m: Member) -> list[SummaryOp]:
            return [msgspec.msgpack.decode(op.payload, type=SummaryOp)
                    for op in m.space.stored_ops(OP_SUMMARY)]

        # every node's op store holds the request and one summary, whatever the number of
        # targets; their states went to the source as notes
        await eventually(lambda: all(len(summaries(m)) == 1 for m in (src, a, b)), 10)
        for m in (src, a, b):
            assert {op.author for op in m.space.ops()} == {src.space.node_id}
        (summary,) = summaries(a)
        assert (summary.state, summary.total, summary.completed, summary.failed) == \
            ("completed", 2, 2, 0)
        assert sorted(t.node for t in summary.targets) == \
            sorted([a.space.node_id.digest, b.space.node_id.digest])
        # a target sees the outcome too, not only its own state
        assert (await a.dist.status(handle)).completed == 2
        # a source restarted from its op store still knows both completed
        again = DistributionService(src.space, src.swarm)
        await again.start()
        try:
            st = await again.status(handle)
            assert [t.state for t in st.targets] == [TargetState.COMPLETED] * 2
        finally:
            await again.aclose()


async def test_a_source_that_missed_the_final_notes_asks_the_silent_targets(
        tmp_path: Path) -> None:
    async with cluster(tmp_path, [[], [], []]) as (src, a, b):
        blob = add(src, 2 * MiB)
        handle = await src.dist.distribute(blob, "all")
        await src.dist.aclose()  # the source's service is down while the targets finish
        await eventually(lambda: a.store.has(blob) and b.store.has(blob), 20)
        assert src.space.stored_ops(OP_SUMMARY) == []  # nobody told the closed service
        again = DistributionService(src.space, src.swarm, DistributionConfig(query_after=0.3))
        await again.start()
        try:
            final = await again.wait_for_completion(handle, 10)
            assert final.state is DistributionState.COMPLETED and final.completed == 2
            await eventually(lambda: len(src.space.stored_ops(OP_SUMMARY)) == 1, 10)
        finally:
            await again.aclose()
