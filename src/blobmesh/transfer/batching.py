"""The asyncio side of batched pulls (:mod:`blobmesh.transfer.batch`): streams and the store.

:class:`BatchService` belongs to a :class:`~blobmesh.transfer.TransferManager` and shares its
store, lease, configuration, validators and admission check.  The receiver's loop reads
answers while the previous commit batch is verified and stored (one transaction each); the
responder reads the next group of blobs while it sends the current one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blobmesh.errors import (
    BadPeerDataError,
    BlobmeshError,
    BlobNotFoundError,
    CorruptBlobError,
    ProtocolError,
    StreamClosedError,
    TransferError,
    TransportError,
    VerificationError,
    VoucherRejectedError,
)
from blobmesh.hashing import BlobId
from blobmesh.store import LeaseId, Store
from blobmesh.transfer import batch
from blobmesh.transfer.batch import (
    BATCH_PROTOCOL,
    COMMIT_BYTES,
    MAX_BLOB,
    BatchPull,
    BatchStep,
    Blob,
    Skip,
    Skipped,
    Want,
)
from blobmesh.transfer.channel import ChannelId, Voucher
from blobmesh.transfer.messages import Error, Selector
from blobmesh.transfer.validation import Revalidator, Validator, Verdict
from blobmesh.transport.api import Network, Stream
from blobmesh.transport.identity import NodeId

if TYPE_CHECKING:
    from blobmesh.transfer.manager import TransferConfig

log = logging.getLogger(__name__)

Commit = list[tuple[BlobId, memoryview]]


@dataclass(slots=True)
class BatchResult:
    """What a batched pull did: the blobs it stored, and those the responder skipped."""

    stored: list[BlobId] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    failure: BlobmeshError | None = None


class BatchService:
    """Batched pulls for one transfer manager: :meth:`pull` (receiver), :meth:`serve`
    (the stream handler of :data:`~blobmesh.transfer.batch.BATCH_PROTOCOL`)."""

    def __init__(self, network: Network, store: Store, lease: LeaseId, config: TransferConfig,
                 validators: dict[str, Validator], revalidators: dict[str, Revalidator],
                 admit: Callable[[NodeId], bool] | None) -> None:
        self.network = network
        self.store = store
        self._lease = lease
        self.config = config
        self._validators = validators
        self._revalidators = revalidators
        self._admit = admit
        self._streams: set[Stream] = set()
        self.refused_unadmitted = 0
        self.blobs_served = 0

    def reset_all(self, reason: str) -> None:
        """Abort every batch stream being served (the manager is closing)."""
        for stream in list(self._streams):
            stream.reset(reason)

    # --- receiver --------------------------------------------------------------------------

    async def pull(self, peer: NodeId, voucher: Voucher, blob_ids: Sequence[BlobId]
                   ) -> BatchResult:
        """Pull ``blob_ids`` over batch streams, resuming a broken stream with the ids not
        answered yet; gives up after ``max_idle_restarts`` attempts in a row that got no
        answer.  Failures are returned in ``failure`` (whatever verified is stored)."""
        run = BatchResult()
        todo = list(blob_ids)
        idle = 0
        c = self.config
        while todo and run.failure is None:
            core = BatchPull(todo, voucher.type, voucher.data)
            answered = len(run.stored) + len(run.skipped)
            try:
                await self._session(peer, core, run)
            except ProtocolError as exc:
                run.failure = run.failure or exc
            except (TransportError, OSError, TimeoutError) as exc:
                todo = core.unanswered()
                idle = 0 if len(run.stored) + len(run.skipped) > answered else idle + 1
                if idle > c.max_idle_restarts:
                    run.failure = run.failure or TransferError(
                        f"batch pull from {peer.short()} broke off ({exc or 'timed out'}): "
                        f"{len(run.stored)} stored, {len(todo)} not received", peer=peer)
                elif todo:
                    log.info("batch pull from %s broke off (%s); resuming", peer.short(), exc)
                    await asyncio.sleep(min(c.restart_backoff * 2 ** idle,
                                            c.restart_backoff_max))
                continue
            todo = []
        return run

    async def _session(self, peer: NodeId, core: BatchPull, run: BatchResult) -> None:
        stream = await self.network.open_stream(peer, BATCH_PROTOCOL)
        commits: asyncio.Queue[Commit | None] = asyncio.Queue(1)
        committer = asyncio.create_task(self._commit_loop(peer, commits, run))
        try:
            await self._send(stream, core.start())
            while not core.done and run.failure is None:
                async with asyncio.timeout(self.config.stall_timeout):
                    raw = await stream.recv()
                step = core.receive(batch.decode(raw))
                await self._send(stream, step)
                if step.commit:
                    await commits.put(step.commit)
            if run.failure is not None:
                stream.reset(str(run.failure))
            else:
                with contextlib.suppress(TransportError):
                    await stream.close()
        except BaseException:
            stream.reset("batch pull ended")
            raise
        finally:
            # what arrived before a break is stored too: nothing verified is lost
            if held := core.take_held():
                await commits.put(held)
            await commits.put(None)
            await committer
            run.skipped += core.skipped
            core.skipped.clear()

    async def _send(self, stream: Stream, step: BatchStep) -> None:
        for want in step.send:
            await stream.send(batch.encode(want))

    async def _commit_loop(self, peer: NodeId, commits: asyncio.Queue[Commit | None],
                           run: BatchResult) -> None:
        """Verify and store each commit batch in one transaction; never stops draining the
        queue (the receive loop must not block on it), even after a failure."""
        while (items := await commits.get()) is not None:
            if run.failure is not None and not isinstance(run.failure, BadPeerDataError):
                continue  # e.g. the disk is full: keep draining, store nothing more
            try:
                results = await self.store.aio.add_verified(
                    [(data, blob_id) for blob_id, data in items], self._lease)
            except BlobmeshError as exc:
                run.failure = run.failure or exc
                continue
            for (blob_id, _), result in zip(items, results, strict=True):
                if isinstance(result, VerificationError):
                    run.failure = run.failure or BadPeerDataError(
                        f"{peer.short()} sent bad data for {blob_id.short()}",
                        peer=peer, blob_id=blob_id)
                else:
                    run.stored.append(blob_id)

    # --- responder -------------------------------------------------------------------------

    async def serve(self, stream: Stream) -> None:
        """Answer the wants of one batch stream, one want at a time (so a peer that sends
        wants faster than it reads answers is held back by the transport's flow control)."""
        if self._admit is not None and not self._admit(stream.peer):
            self.refused_unadmitted += 1
            with contextlib.suppress(TransportError):
                await stream.send(batch.encode(Error(f"{stream.peer.short()} is not admitted")))
                await stream.close()
            return
        self._streams.add(stream)
        try:
            seq = 0
            while True:
                try:
                    async with asyncio.timeout(self.config.stall_timeout):
                        raw = await stream.recv()
                except StreamClosedError:
                    break
                want, ids = batch.check_want(batch.decode(raw), seq)
                await self._answer(stream, want, ids)
                seq += 1
            await stream.close()
        except ProtocolError as exc:
            with contextlib.suppress(TransportError):
                await stream.send(batch.encode(Error(str(exc))))
                await stream.close()
        except (TransportError, TimeoutError) as exc:
            stream.reset(str(exc) or "timed out")
        finally:
            self._streams.discard(stream)

    def _verdicts(self, peer: NodeId, want: Want, ids: list[BlobId]) -> list[Skip | None]:
        """Per id: None when the validator lets it go, else the ``rejected`` answer."""
        voucher = Voucher(want.voucher_type, want.voucher)
        validator = self._validators.get(voucher.type)
        if validator is None or voucher.type in self._revalidators:
            why = (f"unknown voucher type {voucher.type!r}" if validator is None else
                   "vouchers of this type are revalidated: open a channel")
            return [Skip(want.batch, i, "rejected", message=why) for i in range(len(ids))]
        chid = ChannelId(peer, self.network.node_id, want.batch)
        out: list[Skip | None] = []
        for i, blob_id in enumerate(ids):
            try:
                d = validator.validate_pull(False, chid, peer, voucher, blob_id, Selector())
            except Exception as exc:
                log.exception("validator failed")
                out.append(Skip(want.batch, i, "rejected", message=f"validator failed: {exc}"))
                continue
            if d.verdict is Verdict.ACCEPT:
                out.append(None)
            else:  # a pause demands a voucher exchange, which only a channel has
                out.append(Skip(want.batch, i, "rejected", message=d.message or (
                    "voucher rejected" if d.verdict is Verdict.REJECT else
                    "a new voucher is required: open a channel")))
        return out

    async def _answer(self, stream: Stream, want: Want, ids: list[BlobId]) -> None:
        """Every id of ``want``, in order: its bytes or why not.  Blobs are read in groups
        of about COMMIT_BYTES, the next group while the current one is sent."""
        answers: list[Skip | int] = []  # int: the size of a blob to send
        verdicts = self._verdicts(stream.peer, want, ids)
        sizes = await self.store.aio.complete_sizes(
            [b for b, v in zip(ids, verdicts, strict=True) if v is None])
        for i, (blob_id, verdict) in enumerate(zip(ids, verdicts, strict=True)):
            size = sizes.get(blob_id)
            if verdict is not None:
                answers.append(verdict)
            elif size is None:
                answers.append(Skip(want.batch, i, "not_found"))
            elif size > MAX_BLOB:
                answers.append(Skip(want.batch, i, "too_large", size))
            else:
                answers.append(size)
        groups: list[list[int]] = [[]]
        group_bytes = 0
        for i, a in enumerate(answers):
            if isinstance(a, int) and group_bytes + a > COMMIT_BYTES and groups[-1]:
                groups.append([])
                group_bytes = 0
            groups[-1].append(i)
            group_bytes += a if isinstance(a, int) else 0

        def read(group: list[int]) -> asyncio.Future[list[bytes | CorruptBlobError]]:
            blobs = [(ids[i], a) for i in group if isinstance(a := answers[i], int)]
            return asyncio.ensure_future(
                self.store.aio.read_small(blobs, verify=self.config.verify_reads))

        ahead = read(groups[0])
        try:
            for g, group in enumerate(groups):
                datas = iter(await ahead)
                if g + 1 < len(groups):
                    ahead = read(groups[g + 1])
                for i in group:
                    a = answers[i]
                    if isinstance(a, Skip):
                        await stream.send(batch.encode(a))
                        continue
                    data = next(datas)
                    if isinstance(data, CorruptBlobError):
                        log.warning("not serving %s: %s", ids[i].short(), data)
                        await stream.send(batch.encode(
                            Skip(want.batch, i, "unavailable", message=str(data))))
                    else:
                        await stream.send(batch.encode(Blob(want.batch, i, memoryview(data))))
                        self.blobs_served += 1
        finally:
            ahead.cancel()


def raise_failure(peer: NodeId, result: BatchResult) -> None:
    """Raise what a batched pull ran into: its failure, else its first skipped blob as the
    typed error of its code (``too_large`` ones are the caller's to move otherwise)."""
    if result.failure is not None:
        raise result.failure
    for s in result.skipped:
        if s.code == "not_found":
            raise BlobNotFoundError(f"{peer.short()} does not have {s.blob_id}",
                                    blob_id=s.blob_id, peer=peer)
        if s.code == "rejected":
            raise VoucherRejectedError(f"{peer.short()} refused {s.blob_id.short()}: "
                                       f"{s.message or 'no reason'}", blob_id=s.blob_id)
        if s.code == "unavailable":
            raise TransferError(f"{peer.short()} cannot serve {s.blob_id.short()}: "
                                f"{s.message or 'no reason'}", blob_id=s.blob_id, peer=peer)
