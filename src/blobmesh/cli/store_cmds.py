"""Store commands: add, cat, export, ls, info, pin, unpin, gc, fsck."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rich.progress import TaskID

from blobmesh import collection
from blobmesh.cli import collection_cmds
from blobmesh.cli.output import (
    add_command,
    byte_progress,
    console,
    err_console,
    human_bytes,
    human_time,
    human_value,
    print_json,
)
from blobmesh.errors import AmbiguousIdError, BlobmeshError, InvalidIdError, SourceError
from blobmesh.hashing import BlobId
from blobmesh.store import BlobInfo, FsckProblem, Store

LARGE_FILE = 16 * 1024 * 1024


def say(line: str, *, err: bool = False) -> None:
    """One line of human output: no wrapping at the terminal width, no rich markup."""
    (err_console if err else console).print(line, highlight=False, markup=False,
                                            soft_wrap=True)


def open_store(args: argparse.Namespace) -> Store:
    return Store(args.home)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(sub, "add", cmd_add, "add files (or directories, as collections)",
                    json_flag=True)
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="files to add, or directories (each one collection)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the id of each file")
    p.add_argument("--pin", metavar="NAME", help="pin the (single) added blob under NAME")

    p = add_command(sub, "cat", cmd_cat, "write a blob (or ID/path in a collection) to stdout")
    p.add_argument("blob", metavar="ID[/PATH]", help=ID_HELP + "; ID/PATH: a file of a collection")

    p = add_command(sub, "export", cmd_export,
                    "write a blob to a file, a collection to a directory (verified, atomic)")
    p.add_argument("blob", metavar="ID", help=ID_HELP)
    p.add_argument("path", type=Path, metavar="PATH", help="file (or directory) to write")
    p.add_argument("-f", "--force", action="store_true", help="overwrite PATH if it exists")

    add_command(sub, "ls", cmd_ls, "list blobs", json_flag=True)

    p = add_command(sub, "info", cmd_info, "show one blob", json_flag=True)
    p.add_argument("blob", metavar="ID", help=ID_HELP)

    p = add_command(sub, "pin", cmd_pin, "protect a blob from GC under a name")
    p.add_argument("blob", metavar="ID", help=ID_HELP)
    p.add_argument("name", metavar="NAME", help="the pin's name (e.g. model/latest)")

    p = add_command(sub, "unpin", cmd_unpin, "remove a pin")
    p.add_argument("name", metavar="NAME", help="the pin's name")

    add_command(sub, "pins", cmd_pins, "list pins", json_flag=True)

    p = add_command(sub, "gc", cmd_gc, "delete blobs no live lease or pin holds", json_flag=True)
    p.add_argument("--dry-run", action="store_true", help="only report what would go")

    p = add_command(sub, "fsck", cmd_fsck, "rehash everything and report damage", json_flag=True)
    p.add_argument("--repair", action="store_true", help="quarantine corrupt and orphaned data")


ID_HELP = "a blob id or a unique prefix of one in this store"


def resolve_blob(store: Store, text: str) -> BlobId:
    """A blob id from its text or from a unique prefix (``bm1cr7r``, or ``cr7r``) of one in
    ``store``."""
    from blobmesh.node.ids import resolve_prefix

    try:
        return BlobId.parse(text)
    except InvalidIdError as exc:
        malformed = exc
    prefix = text if text.startswith(BlobId.PREFIX) else BlobId.PREFIX + text
    try:
        return BlobId.parse(resolve_prefix(prefix, (str(b.blob_id) for b in store.blobs()),
                                           "blob"))
    except AmbiguousIdError:
        raise
    except InvalidIdError:
        raise InvalidIdError(f"{malformed}; nor is it the prefix of a blob in this store",
                             text=text) from None


def info_json(info: BlobInfo) -> dict[str, Any]:
    return {
        "blob": str(info.blob_id), "size": info.size, "piece_size": info.piece_size,
        "complete": info.complete, "pieces_present": info.pieces_present,
        "pieces_total": info.pieces_total, "pins": list(info.pins), "leases": info.leases,
        "created_at": info.created,
    }


def cmd_add(args: argparse.Namespace) -> int:
    paths: list[Path] = args.paths
    if any(p.is_dir() for p in paths):
        return collection_cmds.cmd_add_dirs(args)
    for p in paths:
        if not p.is_file():
            raise SourceError(f"no such file: {p}" if not p.exists() else f"not a file: {p}")
        if not os.access(p, os.R_OK):
            raise SourceError(f"permission denied: {p}")
    if args.pin and len(paths) != 1:
        raise BlobmeshError("--pin needs exactly one PATH")
    if args.quiet and args.json:
        raise BlobmeshError("--quiet and --json exclude each other")
    results: list[BlobInfo] = []
    show = not (args.quiet or args.json) and sys.stderr.isatty()
    with open_store(args) as store, byte_progress(show) as progress:
        for p in paths:
            size = p.stat().st_size
            task = progress.add_task(p.name, total=size, visible=size >= LARGE_FILE)

            def advance(n: int, task: TaskID = task) -> None:
                progress.advance(task, n)

            info = store.add_path(p, progress=advance)
            progress.remove_task(task)
            if args.pin:
                store.pin(info.blob_id, args.pin)
            results.append(info)
            if args.quiet:
                print(info.blob_id, flush=True)
            elif not args.json:
                say(f"added {info.blob_id}  {human_bytes(info.size):>10}  {p}")
    if args.json:
        print_json([{**info_json(i), "path": str(p)} for i, p in zip(results, paths,
                                                                      strict=True)])
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    if "/" in args.blob:
        return collection_cmds.cmd_cat_path(args)
    out = sys.stdout.buffer
    with open_store(args) as store:
        blob_id = resolve_blob(store, args.blob)
        with store.get_reader(blob_id, None, verify=True) as reader:
            while chunk := reader.read(1 << 20):
                out.write(chunk)
    out.flush()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    path: Path = args.path
    if path.exists() and not args.force:
        raise BlobmeshError(f"{path} exists (use --force to overwrite it)", path=str(path))
    with open_store(args) as store:
        blob_id = resolve_blob(store, args.blob)
        info = store.info(blob_id)
        if collection.is_collection(store, info):
            return collection_cmds.export_collection(args, store, blob_id)
        with byte_progress(sys.stderr.isatty()) as progress:
            task = progress.add_task("export", total=info.size)
            store.export(blob_id, args.path, progress=lambda n: progress.advance(task, n))
    say(f"exported {blob_id} to {args.path}", err=True)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        blobs = store.blobs()
        colls = collection_cmds.summaries(store, blobs)
    if args.json:
        print_json([{**info_json(i), **({"collection": collection_cmds.summary_json(c)}
                                         if (c := colls.get(i.blob_id)) else {})}
                    for i in blobs])
        return 0
    for i in blobs:
        state = "complete" if i.complete else f"partial {i.pieces_present}/{i.pieces_total}"
        pins = f"  pins: {','.join(i.pins)}" if i.pins else ""
        coll = f"  {collection_cmds.summary_line(c)}" if (c := colls.get(i.blob_id)) else ""
        say(f"{i.blob_id}  {human_bytes(i.size):>10}  {state}{coll}{pins}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        info = store.info(resolve_blob(store, args.blob))
        coll = collection.is_collection(store, info) and \
            collection.summarize(store, info.blob_id)
    if args.json:
        print_json({**info_json(info), **({"collection": collection_cmds.summary_json(coll)}
                                          if coll else {})})
        return 0
    rows = {"id": info.blob_id, "size": f"{human_bytes(info.size)} ({info.size} bytes)",
            "piece size": human_bytes(info.piece_size), "complete": info.complete,
            "pieces present": info.pieces_present, "pieces total": info.pieces_total,
            "pins": ", ".join(info.pins) or "-", "leases": info.leases,
            "created": human_time(info.created)}
    if coll:
        rows["collection"] = collection_cmds.summary_line(coll)
    for key, value in rows.items():
        say(f"{key:>15}: {human_value(value)}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        blob_id = resolve_blob(store, args.blob)
        collection.pin(store, blob_id, args.name)  # a collection's members too
    say(f"pinned {blob_id} as {args.name}")
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        blob_id = collection.unpin(store, args.name)
    say(f"unpinned {args.name} ({blob_id})")
    return 0


def cmd_pins(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        pins = store.pins()
    if args.json:
        print_json([{"name": p.name, "blob": str(p.blob_id), "created_at": p.created}
                    for p in pins])
        return 0
    for p in pins:
        if not collection.is_member_pin(p.name):  # they follow their collection's pin
            say(f"{p.name}  {p.blob_id}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        report = collection.gc(store, dry_run=args.dry_run)  # keeps pinned trees whole
    if args.json:
        print_json({"deleted": [str(b) for b in report.deleted],
                    "bytes_freed": report.bytes_freed,
                    "dead_leases_dropped": report.dead_leases_dropped,
                    "partial_kept": report.kept, "dry_run": args.dry_run})
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    say(f"{verb} {len(report.deleted)} blob(s), {human_bytes(report.bytes_freed)}; "
        f"dropped {report.dead_leases_dropped} lease(s) of dead processes")
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    with open_store(args) as store, byte_progress(sys.stderr.isatty() and not args.json) as pr:
        task = pr.add_task("fsck", total=None)
        report = store.fsck(repair=args.repair, progress=lambda n: pr.advance(task, n))
        # pinned collections must decode and hold every member (no repair can fetch them)
        unrepairable = [FsckProblem(f"collection-{p.kind}", str(p.collection), p.collection,
                                    p.detail) for p in collection.check(store)]
        report.problems += unrepairable
    if args.json:
        print_json({"checked": report.checked, "bytes_checked": report.bytes_checked,
                    "ok": report.ok, "repaired": report.repaired,
                    "problems": [{"kind": p.kind, "path": p.path, "detail": p.detail,
                                  "blob": str(p.blob_id) if p.blob_id else None}
                                 for p in report.problems]})
    else:
        for p in report.problems:
            what = str(p.blob_id) if p.blob_id else p.path
            action = " (quarantined)" if args.repair and p not in unrepairable else ""
            say(f"{p.kind}: {what}: {p.detail}{action}")
        say(f"checked {report.checked} blob(s), {human_bytes(report.bytes_checked)}: "
            f"{'ok' if report.ok else f'{len(report.problems)} problem(s)'}")
    return 0 if report.ok or (args.repair and not unrepairable) else 1
