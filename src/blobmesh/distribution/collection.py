"""Distributing a collection: the collection blob and every member as one distribution.

The service carries a collection distribution as an ordinary ``dist/request`` for the
collection blob plus an opaque *plan* (:class:`CollectionPlan`, msgpack) and the tree's total
size.  A target first fetches the collection blob through the swarm, validates it strictly,
then fetches the members it lacks:

* members up to ``small_limit`` bytes travel in one *pack* blob (their contents concatenated
  in manifest order), so thousands of small files cost one swarm job, not one each; the target
  slices the pack, checks every member against its id and commits them in batches;
* larger members are swarm jobs of their own, a few at a time, each starting from the pieces
  the local piece index already holds (``blobmesh.store.piece_index``).

Progress is reported over the whole tree.  Members are pinned under the distribution's pin
(``dist/<handle>#<member>``, see ``blobmesh.collection``) so GC keeps the tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from blobmesh import collection
from blobmesh.collection import Collection
from blobmesh.collection.catalog import member_pin
from blobmesh.collection.manifest import check_path
from blobmesh.collection.tree import SMALL_FILE
from blobmesh.distribution.model import Priority
from blobmesh.distribution.swarm import JobProgress, ProgressCallback, SwarmEngine
from blobmesh.errors import (
    CollectionError,
    CorruptBlobError,
    InvalidCollectionError,
    StoreError,
    TransferError,
)
from blobmesh.hashing import BlobId, choose_piece_size, hash_bytes
from blobmesh.store import BlobInfo, LeaseId, Store
from blobmesh.transport.identity import NodeId

log = logging.getLogger(__name__)

MEMBER_JOBS = 4
"""Swarm jobs (members and the pack) at once per target: enough to keep links busy across
job ends.  More made today's swarm stall under load: a peer's serve loop blocked on a full
stream (its sends wait for credit) cannot read, so two such peers can wait on each other."""
_BATCH_BYTES = 64 * 1024 * 1024
EXPORTS = "exports"
"""Targets export distributed trees under ``HOME/exports`` only."""


class CollectionPlan(msgspec.Struct, frozen=True):
    """What a target needs beyond the collection blob (carried in the request op)."""

    pack: bytes = b""  # blob id of the pack of small members ("" if none)
    pack_size: int = 0
    pack_piece_size: int = 0
    small_limit: int = 0  # members of at most this size are in the pack
    export: str = ""  # each target materialises the tree in HOME/exports/<export>
    export_force: bool = False
    piece_sizes: dict[bytes, int] = {}  # members not at the default piece size for their size


@dataclass(frozen=True, slots=True)
class Plan:
    """A plan as the source's service sees it."""

    payload: bytes
    total_size: int


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """A target's job: get the collection ``blob_id`` and everything its plan names."""

    blob_id: BlobId
    size: int
    piece_size: int
    payload: bytes
    peers: Callable[[], Iterable[NodeId]]
    priority: Priority
    progress: ProgressCallback
    pin: str


Planner = Callable[[BlobId, str, str, bool], Awaitable[Plan | None]]
"""``(blob, pin, export, export_force)``: the plan of a collection (None for a plain blob);
the service has pinned the blob under ``pin`` already."""
PlanFetcher = Callable[[FetchRequest], Awaitable[None]]

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(CollectionPlan)


def plan_export(payload: bytes) -> str:
    """The ``--export`` name a request's plan payload carries ("" for none or a plain blob)."""
    if not payload:
        return ""
    try:
        return _dec.decode(payload).export
    except msgspec.DecodeError:  # a target refuses it when it fetches; a status shows none
        return ""


def small_members(coll: Collection, limit: int) -> list[tuple[BlobId, int]]:
    """The members that travel in the pack, in pack order."""
    return [(m, size) for m, size in coll.members().items() if size <= limit]


def tree_size(coll: Collection, manifest_size: int) -> int:
    """Bytes a target without any of it receives (pack aside): manifest + distinct members."""
    return manifest_size + sum(coll.members().values())


class CollectionDistributor:
    """Both sides of collection distributions on one node."""

    def __init__(self, swarm: SwarmEngine, *, small_limit: int = SMALL_FILE,
                 member_jobs: int = MEMBER_JOBS) -> None:
        self.swarm = swarm
        self.store: Store = swarm.store
        self.small_limit = small_limit
        self.member_jobs = member_jobs
        self._lease = LeaseId.new("collection-distribution")

    # --- the source ------------------------------------------------------------------------

    async def plan(self, blob_id: BlobId, pin: str, export: str, export_force: bool
                   ) -> Plan | None:
        """The plan for distributing ``blob_id`` if it is a collection (else None).

        Every member must be complete here.  The pinned collection holds its members
        (``blobmesh.collection.gc``); the pack of small members is built (content-addressed:
        once per tree) and pinned as one more member pin of ``pin``.
        """
        coll = await asyncio.to_thread(collection.maybe_collection, self.store, blob_id)
        if coll is None:
            if export:
                raise CollectionError(f"--export needs a collection; {blob_id} is a plain blob")
            return None
        if export:
            export_dir(Path("/"), export)  # the same check every target makes
        infos = {i.blob_id: i for i in await asyncio.to_thread(self.store.blobs)
                 if i.complete}  # one query off the event loop, not one per member on it
        missing = [m for m in coll.members() if m not in infos]
        if missing:
            raise CollectionError(f"collection {blob_id.short()} is not complete here: "
                                  f"{len(missing)} member blob(s) missing", blob_id=blob_id)
        small = small_members(coll, self.small_limit)
        odd = {m.digest: infos[m].piece_size for m, size in coll.members().items()
               if size > self.small_limit and infos[m].piece_size != choose_piece_size(size)}
        plan = CollectionPlan(small_limit=self.small_limit, export=export,
                              export_force=export_force, piece_sizes=odd)
        pack_id: BlobId | None = None
        if len(small) > 1:
            info = await asyncio.to_thread(self._build_pack, [(infos[m], s) for m, s in small])
            pack_id = info[0]
            plan = msgspec.structs.replace(plan, pack=pack_id.digest, pack_size=info[1],
                                           pack_piece_size=info[2])
        if pack_id is not None:
            await asyncio.to_thread(self.store.pin, pack_id, member_pin(pin, pack_id))
            await asyncio.to_thread(self.store.advise_lease_dropped, self._lease, pack_id)
        return Plan(_enc.encode(plan), tree_size(coll, infos[blob_id].size))

    def _build_pack(self, small: list[tuple[BlobInfo, int]]) -> tuple[BlobId, int, int]:
        def contents() -> Iterable[bytes]:
            for member, size in small:
                yield _read_small(self.store, member, size)

        info = self.store.add_stream(contents(), self._lease)
        return info.blob_id, info.size, info.piece_size

    # --- a target --------------------------------------------------------------------------

    async def fetch(self, req: FetchRequest) -> None:
        """Get the collection and its missing members; pin them; export if asked."""
        try:
            plan = _dec.decode(req.payload)
        except msgspec.DecodeError as exc:
            raise InvalidCollectionError(f"malformed collection plan: {exc}") from exc
        dest = export_dir(self.store.home / EXPORTS, plan.export) if plan.export else None
        progress = _TreeProgress(req.progress)
        await self.swarm.download(req.blob_id, req.size, req.piece_size, req.peers,
                                  req.priority, progress.job(req.blob_id), pin=req.pin)
        coll = await asyncio.to_thread(collection.read_collection, self.store, req.blob_id)
        members = coll.members()
        # one thread call and a query per 500 members, off the event loop (thousands of them)
        present = set(await asyncio.to_thread(self.store.db.complete_sizes, list(members)))
        progress.expect(tree_size(coll, req.size))
        progress.done([(m, members[m]) for m in present])
        lacking = sum(s for m, s in small_members(coll, plan.small_limit) if m not in present)
        # most small members missing: one pack beats many tiny jobs
        use_pack = bool(plan.pack) and 2 * lacking >= plan.pack_size
        packed = {m for m, _ in small_members(coll, plan.small_limit)} if use_pack else set()
        rest = [(m, s) for m, s in members.items() if m not in packed and m not in present]
        sem = asyncio.Semaphore(self.member_jobs)

        async def one(member: BlobId, size: int) -> None:
            async with sem:
                piece_size = plan.piece_sizes.get(member.digest) or choose_piece_size(size)
                await self.swarm.download(member, size, piece_size, req.peers, req.priority,
                                          progress.job(member),
                                          pin=member_pin(req.pin, member))

        try:
            async with asyncio.TaskGroup() as tg:  # the pack and the members side by side
                if use_pack:
                    tg.create_task(self._fetch_pack(req, plan, coll, lacking, present,
                                                    progress, sem))
                for member, size in rest:
                    tg.create_task(one(member, size))
        except ExceptionGroup as group:
            # the first failure ends the fetch as itself, typed (a TransferError the service
            # retries), not as a group that no ``except TransferError`` catches
            raise group.exceptions[0] from None
        # the pinned collection holds the members (`collection.gc` pins them one by one)
        if dest is not None:
            await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(collection.export_tree, self.store, req.blob_id, dest,
                                    force=plan.export_force)

    async def _fetch_pack(self, req: FetchRequest, plan: CollectionPlan, coll: Collection,
                          lacking: int, present: set[BlobId], progress: _TreeProgress,
                          sem: asyncio.Semaphore) -> None:
        pack = BlobId(plan.pack)
        packed = small_members(coll, plan.small_limit)
        if sum(s for _, s in packed) != plan.pack_size:
            raise InvalidCollectionError("collection plan: pack size does not match its "
                                         "members", blob_id=req.blob_id)
        async with sem:
            await self.swarm.download(pack, plan.pack_size, plan.pack_piece_size, req.peers,
                                      req.priority, progress.job(pack, lacking / plan.pack_size),
                                      pin=member_pin(req.pin, pack))
        done = await asyncio.to_thread(self._unpack, pack, packed, present)
        progress.forget(pack)
        progress.done(done)
        # the pack served its purpose: its pin goes, GC takes it
        await asyncio.to_thread(_unpin_quietly, self.store, member_pin(req.pin, pack))

    def _unpack(self, pack: BlobId, packed: list[tuple[BlobId, int]], present: set[BlobId]
                ) -> list[tuple[BlobId, int]]:
        """Slice the pack into the members not ``present``, each checked against its id,
        committed in batches."""
        out: list[tuple[BlobId, int]] = []
        with self.store.get_reader(pack, None, verify=True) as reader:
            batch: list[tuple[BlobId, bytes]] = []
            nbytes = 0
            for member, size in packed:
                data = reader.read(size)
                if member in present:
                    continue
                if len(data) != size or hash_bytes(data) != member:
                    raise TransferError(f"pack {pack.short()} does not hold member "
                                        f"{member.short()}", blob_id=pack)
                batch.append((member, data))
                nbytes += size
                if nbytes >= _BATCH_BYTES:
                    out += self._commit(batch)
                    batch, nbytes = [], 0
            out += self._commit(batch)
        return out

    def _commit(self, batch: list[tuple[BlobId, bytes]]) -> list[tuple[BlobId, int]]:
        self.store.add_many([data for _, data in batch], inline=True)
        return [(m, len(d)) for m, d in batch]


def export_dir(root: Path, name: str) -> Path:
    """Where a distribution's ``--export NAME`` goes on a target: under its export root.

    Another node names the directory, so it is a relative path (the rules of a collection
    path: no ``..``, not absolute) and never leaves ``HOME/exports``.
    """
    try:
        check_path(name)
    except InvalidCollectionError as exc:
        raise InvalidCollectionError(f"export directory {name!r} must be a relative path "
                                     f"under each target's {EXPORTS}/ ({exc})") from exc
    return root / name


def _read_small(store: Store, member: BlobInfo, size: int) -> bytes:
    """A small member's content, checked against its id (no lease round trips: the member
    is held by the pinned collection)."""
    data = b"".join(store.read_piece(member.blob_id, i, verify=False)
                    for i in range(member.pieces_total))
    if len(data) != size or hash_bytes(data) != member.blob_id:
        raise CorruptBlobError(f"member {member.blob_id} is corrupt on disk; run fsck",
                               blob_id=member.blob_id)
    return data


def _unpin_quietly(store: Store, name: str) -> None:
    with contextlib.suppress(StoreError):
        store.unpin(name)


class _TreeProgress:
    """Sums the progress of the jobs of one tree into one :class:`JobProgress`."""

    def __init__(self, report: ProgressCallback) -> None:
        self._report = report
        self._bytes: dict[BlobId, int] = {}
        self._done = 0  # the sum of _bytes: thousands of members must not cost a sum each
        self._total = 0
        self._rates: dict[BlobId, float] = {}  # of the jobs still running
        self._peers = 0

    def expect(self, total: int) -> None:
        self._total = total

    def done(self, items: Iterable[tuple[BlobId, int]]) -> None:
        """These blobs are complete here: one report for all of them (none if empty)."""
        count = 0
        for blob_id, nbytes in items:
            self._set(blob_id, nbytes)
            self._rates.pop(blob_id, None)
            count += 1
        if count:
            self._emit()

    def forget(self, blob_id: BlobId) -> None:
        self._done -= self._bytes.pop(blob_id, 0)
        self._rates.pop(blob_id, None)

    def job(self, blob_id: BlobId, scale: float = 1.0) -> ProgressCallback:
        """A job's callback; its bytes count ``scale`` times (the pack: only what is new)."""

        def on(p: JobProgress) -> None:
            self._set(blob_id, int(p.bytes_done * scale))
            if p.bytes_done == p.bytes_total:
                self._rates.pop(blob_id, None)
            else:
                self._rates[blob_id] = p.rate
            self._peers = max(self._peers, p.peers)
            self._emit()

        return on

    def _set(self, blob_id: BlobId, nbytes: int) -> None:
        self._done += nbytes - self._bytes.get(blob_id, 0)
        self._bytes[blob_id] = nbytes

    def _emit(self) -> None:
        total = max(self._total, self._done)
        self._report(JobProgress(self._done, total, 0, 0, self._peers,
                                 sum(self._rates.values())))


__all__ = ["CollectionDistributor", "CollectionPlan", "FetchRequest", "Plan", "PlanFetcher",
           "Planner"]
