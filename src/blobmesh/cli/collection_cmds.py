"""The collection side of the store commands: ``add DIR``, collections in ``ls``/``info``,
``cat ID/path``, ``export ID DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.progress import TaskID

from blobmesh import collection
from blobmesh.cli.output import byte_progress, human_bytes, print_json
from blobmesh.collection import Collection, File, Summary, Symlink
from blobmesh.errors import BlobmeshError, CollectionPathNotFoundError, SourceError
from blobmesh.hashing import BlobId
from blobmesh.store import BlobInfo, Store


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
            results.append({"id": str(added.collection_id), "path": str(root),
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


def split_tree_path(text: str) -> tuple[BlobId, str]:
    """``ID/path/in/tree`` into the id and the path."""
    head, _, rest = text.partition("/")
    return BlobId.parse(head), rest


def cmd_cat_path(args: argparse.Namespace) -> int:
    blob_id, path = split_tree_path(args.blob)
    with Store(args.home) as store:
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
