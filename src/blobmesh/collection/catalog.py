"""Collections in a store: reading them, what of them is present, pins that hold every member,
and the checks GC and fsck need."""

from __future__ import annotations

from dataclasses import dataclass

from blobmesh.collection.manifest import MAGIC, MAX_MANIFEST_BYTES, Collection
from blobmesh.errors import (
    BlobmeshError,
    BlobNotFoundError,
    InvalidCollectionError,
    NotACollectionError,
    PinNotFoundError,
    StoreError,
)
from blobmesh.hashing import BlobId
from blobmesh.store import BlobInfo, GcReport, Store

MEMBER_PIN_SEP = "#"
"""A pin ``NAME`` of a collection holds each member ``M`` under ``NAME#<hex of M>``."""


def is_collection(store: Store, info: BlobInfo) -> bool:
    """Whether a complete blob starts like a collection manifest (cheap: reads the magic)."""
    if not info.complete or info.size < len(MAGIC) or info.size > MAX_MANIFEST_BYTES:
        return False
    try:
        return store.read_range(info.blob_id, 0, len(MAGIC)) == MAGIC
    except StoreError:
        return False


def read_collection(store: Store, blob_id: BlobId) -> Collection:
    """Read and validate a collection held complete in ``store``.

    Raises :class:`BlobNotFoundError`/:class:`BlobIncompleteError` if it is not here,
    :class:`NotACollectionError` if the blob is something else and
    :class:`InvalidCollectionError` if its manifest is malformed or unsafe.
    """
    info = store.info(blob_id)
    if info.size > MAX_MANIFEST_BYTES:
        raise NotACollectionError(f"{blob_id} is not a collection", blob_id=blob_id)
    with store.get_reader(blob_id, None, verify=True) as reader:  # complete, or raises
        data = reader.read()
    if not data.startswith(MAGIC):
        raise NotACollectionError(f"{blob_id} is a plain blob, not a collection",
                                  blob_id=blob_id)
    try:
        return Collection.decode(data)
    except InvalidCollectionError as exc:
        raise InvalidCollectionError(f"collection {blob_id.short()}: {exc}", blob_id=blob_id,
                                     **exc.context) from exc


def maybe_collection(store: Store, blob_id: BlobId) -> Collection | None:
    """The collection if ``blob_id`` is one held here, else None (plain, absent or partial)."""
    try:
        info = store.info(blob_id)
    except BlobNotFoundError:
        return None
    if not is_collection(store, info):
        return None
    return read_collection(store, blob_id)


@dataclass(frozen=True, slots=True)
class Summary:
    """A collection and how much of it this store holds."""

    blob_id: BlobId
    entries: int
    files: int
    total_size: int
    members: int
    members_present: int
    bytes_present: int

    @property
    def complete(self) -> bool:
        return self.members_present == self.members


def summarize(store: Store, blob_id: BlobId, collection: Collection | None = None,
              infos: dict[BlobId, BlobInfo] | None = None) -> Summary:
    coll = collection or read_collection(store, blob_id)
    if infos is None:
        infos = {i.blob_id: i for i in store.blobs()}
    members = coll.members()
    present = 0
    nbytes = 0
    for member in members:
        info = infos.get(member)
        if info is not None:
            present += info.complete
            nbytes += info.bytes_present
    return Summary(blob_id, len(coll.entries), sum(1 for _ in coll.files()), coll.total_size,
                   len(members), present, nbytes)


def collections(store: Store) -> dict[BlobId, Collection]:
    """Every valid collection held complete here (invalid manifests are skipped)."""
    out: dict[BlobId, Collection] = {}
    for info in store.blobs():
        if is_collection(store, info):
            try:
                out[info.blob_id] = read_collection(store, info.blob_id)
            except BlobmeshError:
                continue
    return out


# --- pins that hold every member -------------------------------------------------------------


def member_pin(name: str, member: BlobId) -> str:
    return f"{name}{MEMBER_PIN_SEP}{member.hex}"


def _check_pin_name(name: str) -> None:
    if not name or len(name) + 65 > 256:
        raise StoreError(f"a pin name of a collection is 1 to {256 - 65} characters")


def is_member_pin(name: str) -> bool:
    """Whether ``name`` is a member pin some collection pin holds."""
    return _member_pin_base(name) is not None


def _member_pin_base(name: str) -> str | None:
    """The collection pin a member pin belongs to, or None for any other pin."""
    base, sep, suffix = name.rpartition(MEMBER_PIN_SEP)
    if sep and len(suffix) == 64 and all(c in "0123456789abcdef" for c in suffix):
        return base
    return None


def pin_members(store: Store, name: str, collection: Collection) -> int:
    """Pin every member of ``collection`` held here under pin ``name``; returns pins added.

    Members not (yet) in the store are skipped: call again once they arrive.  Other member
    pins of ``name`` (e.g. a distribution's pack) are left alone.
    """
    _check_pin_name(name)
    want = {member_pin(name, m): m for m in collection.members()}
    have = {p.name: p.blob_id for p in store.pins() if _member_pin_base(p.name) == name}
    added = 0
    for pin, member in want.items():
        if have.get(pin) == member:
            continue
        try:
            store.pin(member, pin)
            added += 1
        except BlobNotFoundError:
            continue
    return added


def pin(store: Store, blob_id: BlobId, name: str) -> Collection | None:
    """Pin a blob; a collection's members are pinned with it.  Returns the collection."""
    coll = maybe_collection(store, blob_id)
    if coll is not None:
        _check_pin_name(name)
    if not any(p.name == name and p.blob_id == blob_id for p in store.pins()):
        _drop_member_pins(store, name)  # the name may have held another collection
    store.pin(blob_id, name)
    if coll is not None:
        pin_members(store, name, coll)
    return coll


def unpin(store: Store, name: str) -> BlobId:
    """Remove a pin and the member pins it holds."""
    blob_id = store.unpin(name)
    _drop_member_pins(store, name)
    return blob_id


def _drop_member_pins(store: Store, name: str) -> None:
    for p in store.pins():
        if _member_pin_base(p.name) == name:
            try:
                store.unpin(p.name)
            except PinNotFoundError:
                continue


def protect_pinned(store: Store) -> int:
    """Before a GC: every pinned collection's members get their member pins (e.g. a
    collection pinned by a plain ``Store.pin``); member pins of pins now gone are dropped.

    Returns the number of member pins added.
    """
    pins = store.pins()
    names = {p.name for p in pins}
    added = 0
    for p in pins:
        base = _member_pin_base(p.name)
        if base is not None:
            if base not in names:
                store.unpin(p.name)  # its collection pin is gone
            continue
        coll = maybe_collection(store, p.blob_id)
        if coll is not None:
            added += pin_members(store, p.name, coll)
    return added


def gc(store: Store, *, dry_run: bool = False) -> GcReport:
    """``Store.gc`` that keeps every member of every pinned collection.

    A collection pinned under any name (``blobmesh pin``, a distribution's ``dist/<h>``)
    first gets member pins for the members it lacks them for; call this rather than
    ``Store.gc`` wherever collections may live.
    """
    protect_pinned(store)
    return store.gc(dry_run=dry_run)


@dataclass(frozen=True, slots=True)
class MemberProblem:
    collection: BlobId
    kind: str  # "invalid", "missing" (members)
    detail: str


def check(store: Store) -> list[MemberProblem]:
    """fsck for collections: every pinned collection must decode and hold all its members."""
    problems: list[MemberProblem] = []
    infos = {i.blob_id: i for i in store.blobs()}
    pinned = {p.blob_id for p in store.pins() if _member_pin_base(p.name) is None}
    for blob_id in pinned:
        info = infos.get(blob_id)
        if info is None or not is_collection(store, info):
            continue
        try:
            coll = read_collection(store, blob_id)
        except InvalidCollectionError as exc:
            problems.append(MemberProblem(blob_id, "invalid", str(exc)))
            continue
        s = summarize(store, blob_id, coll, infos)
        if not s.complete:
            problems.append(MemberProblem(
                blob_id, "missing",
                f"{s.members - s.members_present} of {s.members} member blob(s) missing"))
    return problems
