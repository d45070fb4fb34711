"""Node commands: node run, peers, distribute, distributions, status, cancel."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from rich.live import Live
from rich.table import Table

from blobmesh.cli.output import (
    add_command,
    console,
    err_console,
    human_bytes,
    print_json,
)
from blobmesh.distribution.model import (
    DistributionStatus,
    Priority,
    Scope,
    TargetState,
)
from blobmesh.errors import BlobmeshError, InvalidIdError
from blobmesh.hashing import BlobId
from blobmesh.node.client import NodeClient
from blobmesh.node.codec import status_to_json
from blobmesh.store import Store, default_home


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home) if args.home else default_home()


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:

    node = sub.add_parser("node", help="run a node", description="run a node")
    node_sub = node.add_subparsers(dest="node_command", required=True, metavar="COMMAND")
    p = add_command(node_sub, "run", cmd_node_run,
                    "run a node until SIGINT/SIGTERM; prints its ticket first")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    p.add_argument("--bootstrap", action="append", default=[], metavar="TICKET",
                   help="a peer to join through (repeatable)")
    p.add_argument("--group", action="append", default=[], metavar="G",
                   help="a group (formation) this node belongs to (repeatable)")
    p.add_argument("--cap", action="append", default=[], metavar="KEY=VALUE",
                   help="a capability such as gpu=true or mem_gb=64 (repeatable)")
    p.add_argument("--space", metavar="NAME",
                   help="the space to join (default: the ticket's, else blobmesh)")
    p.add_argument("--secret-file", type=Path, metavar="F",
                   help="file holding the space's shared secret (default: the ticket's, "
                        "else one kept in the home, made on first run)")
    p.add_argument("--open", action="store_true",
                   help="an open space: no secret, anyone who knows its name may join")
    p.add_argument("--distributor", action="append", default=[], metavar="NODE_ID",
                   help="accept distributions only from these nodes (repeatable; "
                        "default: any member)")
    p.add_argument("--upload-rate", type=float, default=0, metavar="BYTES_PER_S")
    p.add_argument("--download-rate", type=float, default=0, metavar="BYTES_PER_S")
    p.add_argument("--mdns", action="store_true", help="discover peers on the LAN")

    add_command(sub, "peers", cmd_peers, "list the peers the running node knows", json_flag=True)

    p = add_command(sub, "distribute", cmd_distribute,
                    "distribute a file or blob to a scope of nodes",
            json_flag=True)
    p.add_argument("what", metavar="PATH_OR_ID")
    p.add_argument("--to", required=True, metavar="SCOPE",
                   help="all | group:NAME | node:ID[,ID] | cap:EXPR")
    p.add_argument("--priority", default="normal",
                   choices=[str(p) for p in Priority])
    p.add_argument("--share-url", action="append", default=[], metavar="URL",
                   help="an external share to fall back on (repeatable)")
    p.add_argument("--wait", action="store_true", help="wait until every target is done")
    p.add_argument("--timeout", type=float, default=None, metavar="S")

    add_command(sub, "distributions", cmd_distributions, "list distributions", json_flag=True)
    p = add_command(sub, "status", cmd_status, "show a distribution", json_flag=True)
    p.add_argument("handle", metavar="HANDLE")
    p = add_command(sub, "cancel", cmd_cancel, "cancel a distribution", json_flag=True)
    p.add_argument("handle", metavar="HANDLE")


def cmd_node_run(args: argparse.Namespace) -> int:
    from blobmesh.node.daemon import NodeConfig, run_node_forever

    config = NodeConfig.from_cli(_home(args), listen=args.listen, bootstrap=args.bootstrap,
                                 groups=args.group, caps=args.cap, space=args.space,
                                 secret_file=args.secret_file, upload_rate=args.upload_rate,
                                 download_rate=args.download_rate, mdns=args.mdns,
                                 open_space=args.open, distributors=args.distributor)
    return run_node_forever(config)


def cmd_peers(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with NodeClient(_home(args)) as node:
            peers = await node.peers()
        if args.json:
            print_json(peers)
            return 0
        table = Table("node", "alive", "groups", "capabilities", "addresses")
        for p in peers:
            caps = ",".join(f"{k}={v}" for k, v in sorted(p["capabilities"].items()))
            table.add_row(p["node"], "yes" if p["alive"] else "no", ",".join(p["groups"]),
                          caps, " ".join(p["addresses"]))
        console.print(table)
        return 0

    return _run(go())


def _resolve_blob(home: Path, what: str) -> BlobId:
    if what.startswith(BlobId.PREFIX) and not Path(what).exists():
        return BlobId.parse(what)
    path = Path(what)
    if not path.exists():
        raise InvalidIdError(f"{what!r} is neither an existing file nor a blob id")
    with Store(home) as store:
        info = store.add_path(path)
    err_console.print(f"added {path} as {info.blob_id}", highlight=False)
    return info.blob_id


def render_status(s: DistributionStatus) -> Table:
    elapsed = (s.finished or time.time()) - s.started
    table = Table(title=f"{s.handle}  {s.blob_id.short()}…  {human_bytes(s.size)}  "
                        f"to {s.scope}  [{s.priority}]  {s.state}  "
                        f"{s.completed}/{s.total} done  {elapsed:.1f}s",
                  title_justify="left")
    table.add_column("target")
    table.add_column("state")
    table.add_column("progress", justify="right")
    table.add_column("rate", justify="right")
    table.add_column("note")
    for t in s.targets:
        pct = 100.0 * t.bytes_done / s.size if s.size else 100.0
        bar_len = 20
        filled = int(bar_len * min(pct, 100) / 100)
        style = {TargetState.COMPLETED: "green", TargetState.FAILED: "red",
                 TargetState.CANCELLED: "yellow"}.get(t.state, "")
        table.add_row(t.node.short() + "…", f"[{style}]{t.state}[/]" if style else str(t.state),
                      "█" * filled + "░" * (bar_len - filled) + f" {pct:5.1f}%",
                      f"{human_bytes(t.rate)}/s" if t.rate else "", t.reason[:60])
    return table


def cmd_distribute(args: argparse.Namespace) -> int:
    Scope.parse(args.to)  # a malformed scope fails before any work
    home = _home(args)
    blob_id = _resolve_blob(home, args.what)

    async def go() -> int:
        async with NodeClient(home) as node:
            status = await node.distribute(str(blob_id), args.to, args.priority,
                                           args.share_url)
            if not args.wait:
                if args.json:
                    print_json(status_to_json(status))
                else:
                    console.print(f"distribution {status.handle} started: {status.total} "
                                  f"target(s)", highlight=False)
                return 0
            final = await _follow(node, str(status.handle), args.timeout, not args.json)
            if args.json:
                print_json(status_to_json(final))
            return 0 if final.done and final.failed == 0 and \
                final.completed == final.total else 1

    return _run(go())


async def _follow(node: NodeClient, handle: str, timeout: float | None, live: bool
                  ) -> DistributionStatus:
    status = await node.status(handle)

    async def watch() -> None:
        nonlocal status
        with Live(render_status(status), console=err_console, refresh_per_second=8,
                  transient=False, auto_refresh=live) as view:
            async for s in node.events(handle):
                status = s
                if live:
                    view.update(render_status(s))

    try:
        await asyncio.wait_for(watch(), timeout)
    except TimeoutError:
        raise BlobmeshError(
            f"distribution {handle} not finished after {timeout}s: {status.completed}/"
            f"{status.total} targets completed", handle=handle) from None
    return status


def _print_status(status: DistributionStatus, as_json: bool) -> None:
    if as_json:
        print_json(status_to_json(status))
    else:
        console.print(render_status(status))


def cmd_distributions(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with NodeClient(_home(args)) as node:
            items = await node.distributions()
        if args.json:
            print_json([status_to_json(s) for s in items])
            return 0
        for s in items:
            console.print(f"{s.handle}  {s.state:<22} {s.completed}/{s.total}  "
                          f"{human_bytes(s.size):>10}  {s.blob_id.short()}…  to {s.scope}",
                          highlight=False)
        if not items:
            console.print("no distributions")
        return 0

    return _run(go())


def cmd_status(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with NodeClient(_home(args)) as node:
            _print_status(await node.status(args.handle), args.json)
        return 0

    return _run(go())


def cmd_cancel(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with NodeClient(_home(args)) as node:
            _print_status(await node.cancel(args.handle), args.json)
        return 0

    return _run(go())


__all__ = ["register", "render_status"]
