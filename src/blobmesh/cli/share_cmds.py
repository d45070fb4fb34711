"""Share commands: share, unshare, load (external file shares, ``docs/shares.md``).

Results go to stdout with plain ``print`` so long ids and paths are never wrapped.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from blobmesh import collection
from blobmesh.cli.collection_cmds import load_members, share_members
from blobmesh.cli.output import byte_progress, human_bytes
from blobmesh.cli.store_cmds import open_store, resolve_blob
from blobmesh.errors import InvalidIdError
from blobmesh.hashing import BlobId
from blobmesh.shares import ShareDir, load_blob, validate_resource_id


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("share", help="publish a blob into a share directory",
                       description="Publish a blob into a directory any static web server "
                                   "can serve; sharing it again is a no-op.")
    p.set_defaults(handler=cmd_share)
    p.add_argument("blob", metavar="ID", help="a blob id or a unique prefix of one here")
    p.add_argument("--dir", required=True, type=Path, metavar="DIR", help="share directory")
    p.add_argument("--resource", metavar="NAME", help="also publish it under this resource id")

    p = sub.add_parser("unshare", help="remove a blob or a resource id from a share directory",
                       description="Remove a blob (with every resource id naming it) or one "
                                   "resource id from a share directory.")
    p.set_defaults(handler=cmd_unshare)
    p.add_argument("ref", metavar="ID", help="blob id or resource id")
    p.add_argument("--dir", required=True, type=Path, metavar="DIR", help="share directory")

    p = sub.add_parser("load", help="load a blob from share URLs (verified)",
                       description="Load a blob, by blob id or resource id, from the share "
                                   "directories served at the given URLs, verified piece by "
                                   "piece; an interrupted load resumes where it stopped.")
    p.set_defaults(handler=cmd_load)
    p.add_argument("ref", metavar="ID", help="blob id or resource id")
    p.add_argument("--url", action="append", required=True, metavar="URL",
                   help="base URL of a share directory (http, https, file); repeatable")
    p.add_argument("--tries", type=int, default=3, metavar="N",
                   help="passes over the URL list (default 3)")
    p.add_argument("--retry-timeout", type=float, default=1.0, metavar="S",
                   help="pause before the second pass, doubling after (default 1)")
    p.add_argument("--stall-timeout", type=float, default=30.0, metavar="S",
                   help="give up on a URL that sends nothing for S seconds (default 30)")
    p.add_argument("--deadline", type=float, default=None, metavar="S",
                   help="give up after S seconds, keeping verified data for a resume")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the blob id")


def parse_ref(text: str) -> BlobId | str:
    """A blob id if ``text`` parses as one, else a (validated) resource id."""
    try:
        return BlobId.parse(text)
    except InvalidIdError:
        return validate_resource_id(text)


def cmd_share(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        blob_id = resolve_blob(store, args.blob)
        share = ShareDir(args.dir)
        result = share.share(store, blob_id, args.resource)
        members = share_members(store, share, blob_id)  # a collection: its members too
    verb = "shared" if result.created or members else "already shared"
    name = f" as {args.resource}" if args.resource else ""
    print(f"{verb} {blob_id}{name} in {args.dir}"
          + (f" with {members} new member blob(s)" if members else ""))
    return 0


def cmd_unshare(args: argparse.Namespace) -> int:
    removed = ShareDir(args.dir).unshare(parse_ref(args.ref))
    print(f"unshared {args.ref} from {args.dir} ({', '.join(removed)})")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    deadline = None if args.deadline is None else time.monotonic() + args.deadline
    with open_store(args) as store, \
            byte_progress(sys.stderr.isatty() and not args.quiet) as progress:
        task = progress.add_task("load", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        options = {"max_tries": args.tries, "retry_timeout": args.retry_timeout,
                   "deadline": deadline, "stall_timeout": args.stall_timeout}
        reader = asyncio.run(load_blob(store, ref, args.url, progress=advance, **options))
        reader.close()
        # a collection: its members from the same shares, then it is pinned like a get
        if asyncio.run(load_members(store, reader.blob_id, args.url, **options)):
            collection.pin(store, reader.blob_id, f"load/{reader.blob_id}")
    if args.quiet:
        print(reader.blob_id)
    else:
        print(f"loaded {reader.blob_id}  {human_bytes(reader.size):>10}")
    return 0
