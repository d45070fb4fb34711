"""The collection side of the store commands: ``add DIR``, collections in ``ls``/``info``,
``cat ID/path``, ``export ID DIR``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import TaskID

from blobmesh import collection
from blobmesh.cli.output import byte_progress, human_bytes, print_json
from blobmesh.collection import Collection, File, Summary, Symlink
from blobmesh.errors import BlobmeshError, CollectionPathNotFoundError, SourceError
from blobmesh.hashing import BlobId
from blobmesh.store import BlobInfo, Store

if TYPE_CHECKING:  # the network layers load only in the commands that move trees
    from blobmesh.shares import ShareDir
    from blobmesh.transfer import TransferManager, Voucher
    from blobmesh.transport import NodeId

_CHANNELS = 4


def _say(line: str, *, err: bool = False) -> None:
    from blobmesh.cli.store_cmds import say

    say(line, err=err)


def cmd_add_dirs(args: argparse.Namespace) -> int:
    """``add DIR [DIR...]``: each directory becomes one collection."""
    paths: list[Path] = args.paths
    if not all(p.is_dir() for p in paths):
        raise SourceError("give either files or directories to one add, not both")
    if args.pin and len(paths) != 1:
        raise BlobmeshError("--pin needs exactly one PATH")
    if args.quiet and args.json:
        raise BlobmeshError("--quiet and --json exclude each other")
    results: list[dict[str, Any]] = []
    show = not (args.quiet or args.json) and sys.stderr.isatty()
    with Store(args.home) as store, byte_progress(show) as progress:
        for root in paths:
            scan = collection.scan_tree(root)
            task = progress.add_task(f"{root.name}/ ({len(scan.files)} files)",
                                     total=scan.total_size)

            def advance(n: int, task: TaskID = task) -> None:
                progress.advance(task, n)

            added = collection.add_tree(store, scan, progress=advance)
            progress.remove_task(task)
            if args.pin:
                collection.pin(store, added.collection_id, args.pin)
            coll = added.collection
            if args.quiet:
                print(added.collection_id, flush=True)
            elif not args.json:
                _say(f"added {added.collection_id}  {human_bytes(coll.total_size):>10}  "
                     f"{root}/  ({len(coll.entries)} entries; {added.new_blobs} new blob(s), "
                     f"{human_bytes(added.new_bytes)} new)")
            results.append({"blob": str(added.collection_id), "path": str(root),
                            "entries": len(coll.entries),
                            "files": sum(1 for _ in coll.files()),
                            "total_size": coll.total_size, "new_blobs": added.new_blobs,
                            "new_bytes": added.new_bytes})
    if args.json:
        print_json(results)
    return 0


def summaries(store: Store, infos: list[BlobInfo]) -> dict[BlobId, Summary]:
    """Summaries of the collections among ``infos``."""
    by_id = {i.blob_id: i for i in infos}
    return {cid: collection.summarize(store, cid, coll, by_id)
            for cid, coll in collection.collections(store).items()}


def summary_json(s: Summary) -> dict[str, Any]:
    return {"entries": s.entries, "files": s.files, "total_size": s.total_size,
            "members": s.members, "members_present": s.members_present,
            "bytes_present": s.bytes_present, "complete": s.complete}


def summary_line(s: Summary) -> str:
    pct = 100.0 * s.bytes_present / s.total_size if s.total_size else 100.0
    return (f"collection: {s.entries} entries, {human_bytes(s.total_size)}, "
            f"{s.members_present}/{s.members} members present ({pct:.0f}%)")


def split_tree_path(store: Store, text: str) -> tuple[BlobId, str]:
    """``ID/path/in/tree`` into the id (a unique prefix will do) and the path."""
    from blobmesh.cli.store_cmds import resolve_blob

    head, _, rest = text.partition("/")
    return resolve_blob(store, head), rest


def cmd_cat_path(args: argparse.Namespace) -> int:
    with Store(args.home) as store:
        blob_id, path = split_tree_path(store, args.blob)
        coll = collection.read_collection(store, blob_id)
        entry = _resolve(coll, path)
        out = sys.stdout.buffer
        with store.get_reader(entry.blob_id, None, verify=True) as reader:
            while chunk := reader.read(1 << 20):
                out.write(chunk)
        out.flush()
    return 0


def _resolve(coll: Collection, path: str) -> File:
    """The file at ``path``, following links inside the tree (a few hops at most)."""
    for _ in range(16):
        entry = coll.find(path)
        if entry is None:
            raise CollectionPathNotFoundError(f"no {path!r} in the collection", path=path)
        if isinstance(entry, File):
            return entry
        if not isinstance(entry, Symlink):
            raise CollectionPathNotFoundError(f"{path!r} is a directory", path=path)
        parts = entry.path.split("/")[:-1]
        for part in entry.target.split("/"):
            if part == "..":
                parts.pop()
            else:
                parts.append(part)
        path = "/".join(parts)
    raise CollectionPathNotFoundError(f"too many symlinks resolving {path!r}", path=path)


def export_collection(args: argparse.Namespace, store: Store, blob_id: BlobId) -> int:
    coll = collection.read_collection(store, blob_id)
    with byte_progress(sys.stderr.isatty()) as progress:
        task = progress.add_task("export", total=coll.total_size)
        collection.export_tree(store, blob_id, args.path, force=args.force,
                               progress=lambda n: progress.advance(task, n))
    _say(f"exported {blob_id} ({len(coll.entries)} entries) to {args.path}", err=True)
    return 0


# --- get / push / share / load of a collection: the collection blob first, then its members --


async def transfer_members(mgr: TransferManager, store: Store, peer: NodeId, blob_id: BlobId,
                           voucher: Voucher, *, pull: bool) -> int:
    """After the collection blob moved: move its members too (those missing here when
    pulling: small ones batched on one stream, the rest a few channels at a time; pushing,
    a few channels at a time); returns how many moved.  A plain blob: 0."""
    coll = await asyncio.to_thread(collection.maybe_collection, store, blob_id)
    if coll is None:
        return 0
    if pull:
        moved = await mgr.pull_many(peer, voucher, coll.members(), channels=_CHANNELS)
        # what came over the network stays until the user unpins it
        await asyncio.to_thread(collection.pin, store, blob_id, f"get/{blob_id}")
        return len(moved)
    sem = asyncio.Semaphore(_CHANNELS)

    async def one(member: BlobId) -> None:
        async with sem:
            await mgr.wait(await mgr.open_push(peer, voucher, member))

    async with asyncio.TaskGroup() as tg:
        for member in coll.members():
            tg.create_task(one(member))
    return len(coll.members())


def export_any(store: Store, blob_id: BlobId, dest: str | Path) -> None:
    """Export a collection as its tree, a plain blob as a file."""
    if collection.maybe_collection(store, blob_id) is not None:
        collection.export_tree(store, blob_id, dest)
    else:
        store.export(blob_id, dest)


def share_members(store: Store, share: ShareDir, blob_id: BlobId) -> int:
    """Share every member of a collection next to it; returns how many were new there."""
    coll = collection.maybe_collection(store, blob_id)
    if coll is None:
        return 0
    return sum(share.share(store, m).created for m in coll.members())


async def load_members(store: Store, blob_id: BlobId, urls: list[str], **options: Any) -> int:
    """After loading a collection blob: load its missing members from the same shares."""
    from blobmesh.shares import load_blob

    coll = await asyncio.to_thread(collection.maybe_collection, store, blob_id)
    if coll is None:
        return 0
    todo = [m for m in coll.members() if not store.has(m)]
    sem = asyncio.Semaphore(_CHANNELS)

    async def one(member: BlobId) -> None:
        async with sem:
            (await load_blob(store, member, urls, **options)).close()

    async with asyncio.TaskGroup() as tg:
        for member in todo:
            tg.create_task(one(member))
    return len(todo)
