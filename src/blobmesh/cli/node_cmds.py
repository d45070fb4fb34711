"""Node commands: node run, node info, peers, distribute, distributions, status, cancel."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from rich.live import Live
from rich.markup import escape
from rich.table import Table

from blobmesh.cli.output import (
    add_command,
    caps_text,
    console,
    err_console,
    human_bytes,
    human_duration,
    human_time,
    human_value,
    positive_float,
    print_json,
)
from blobmesh.cli.store_cmds import resolve_blob
from blobmesh.distribution.model import (
    DistributionHandle,
    DistributionStatus,
    Priority,
    Scope,
    ScopeError,
    TargetState,
    TargetStatus,
)
from blobmesh.errors import BlobmeshError, InvalidIdError
from blobmesh.hashing import BlobId
from blobmesh.node.client import NodeClient
from blobmesh.node.codec import status_to_json
from blobmesh.store import Store, default_home
from blobmesh.transport.identity import NodeId

STALLED_AFTER = 10.0
"""Seconds without progress after which a transferring target shows as stalled."""


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home) if args.home else default_home()


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = sub.add_parser("node", help="run a node, or show the running one",
                          description="run a node, or show the running one")
    node_sub = node.add_subparsers(dest="node_command", required=True, metavar="COMMAND")
    p = add_command(node_sub, "run", cmd_node_run,
                    "run a node until SIGINT/SIGTERM; prints its ticket first")
    add_node_run_options(p)
    add_command(node_sub, "info", cmd_node_info,
                "show the running node: id, addresses, ticket, version, groups, "
                "capabilities, uptime, store usage", json_flag=True)

    add_command(sub, "peers", cmd_peers, "list the peers the running node knows", json_flag=True)

    p = add_command(sub, "distribute", cmd_distribute,
                    "distribute a file, directory (as a collection) or blob to a scope of nodes",
                    json_flag=True)
    p.add_argument("what", metavar="PATH_OR_ID",
                   help="a file or directory (added first) or a blob id prefix")
    p.add_argument("--export", default="", metavar="NAME",
                   help="a collection: each target writes the tree to HOME/exports/NAME "
                        "when complete")
    p.add_argument("--export-force", action="store_true",
                   help="with --export: replace an existing tree there on the targets")
    p.add_argument("--to", required=True, metavar="SCOPE",
                   help="all | group:NAME | node:ID[,ID] | cap:EXPR (quote it: "
                        "'cap:gpu=true,mem_gb>=16')")
    p.add_argument("--priority", default="normal", choices=[str(p) for p in Priority],
                   help="order against other distributions on every node (default normal)")
    p.add_argument("--share-url", action="append", default=[], metavar="URL",
                   help="an external share to fall back on (repeatable)")
    p.add_argument("--new", action="store_true",
                   help="start a new distribution even if one of this blob to this scope "
                        "is active (by default its handle is returned)")
    p.add_argument("--wait", action="store_true", help="wait until every target is done")
    p.add_argument("--timeout", type=positive_float, default=None, metavar="S",
                   help="with --wait: give up waiting after S seconds (the distribution "
                        "goes on; default: wait for ever)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the handle")

    p = add_command(sub, "distributions", cmd_distributions,
                    "list distributions, or prune the finished ones", json_flag=True)
    p.add_argument("action", nargs="?", choices=["list", "prune"], default="list",
                   help="list (default) or prune: hide every finished distribution")
    p.add_argument("--active", action="store_true", help="only distributions still running")
    p = add_command(sub, "status", cmd_status, "show a distribution", json_flag=True)
    p.add_argument("handle", metavar="HANDLE", help="a distribution handle or unique prefix")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep showing progress until the distribution is done")
    p = add_command(sub, "cancel", cmd_cancel, "cancel a distribution", json_flag=True)
    p.add_argument("handle", metavar="HANDLE", help="a distribution handle or unique prefix")


def add_node_run_options(p: argparse.ArgumentParser) -> None:
    """Every ``node run`` option (each can also be set in the config file)."""
    from blobmesh.node.config import add_run_arguments

    add_run_arguments(p)
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="TOML file setting any of these options (default: HOME/config.toml "
                        "if it exists); flags override it")
    p.add_argument("-v", "--verbose", action="store_true", help="same as --log-level debug")


def cmd_node_run(args: argparse.Namespace) -> int:
    from blobmesh.node.config import node_settings
    from blobmesh.node.daemon import run_node_forever

    home = _home(args)
    settings = node_settings(home, args)
    if settings.node.http_listen is not None:  # the dashboard is a layer above node
        from blobmesh.dashboard import serve_dashboard

        settings.node.services = (serve_dashboard(settings.node.http_listen),)
    return run_node_forever(settings, lambda: node_settings(home, args))


def cmd_node_info(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with NodeClient(_home(args)) as node:
            info = await node.node()
        if args.json:
            print_json(info)
            return 0
        store = info["store"]
        rows = [("node", info["node"]), ("version", info["version"]), ("space", info["space"]),
                ("listen", info["listen"]), ("addresses", " ".join(info["addresses"])),
                ("ticket", info["ticket"]), ("groups", ",".join(info["groups"]) or "-"),
                ("capabilities", caps_text(info["capabilities"]) or "-"),
                ("started", human_time(info["started_at"])),
                ("uptime", human_duration(info["uptime_seconds"])),
                ("peers alive", str(info["peers_alive"])),
                ("store", f"{store['blobs']} blob(s), {store['partial_blobs']} partial, "
                          f"{human_bytes(store['bytes'])}"),
                ("home", info["home"]), ("pid", str(info["pid"]))]
        for key, value in rows:
            console.print(f"{key:>12}: {value}", highlight=False, markup=False, soft_wrap=True)
        return 0

    return _run(go())


def cmd_peers(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with NodeClient(_home(args)) as node:
            peers = await node.peers()
        if args.json:
            print_json(peers)
            return 0
        table = Table("node", "alive", "groups", "capabilities", "addresses", "last seen")
        for p in peers:
            table.add_row(p["node"], human_value(p["alive"]), escape(",".join(p["groups"])),
                          escape(caps_text(p["capabilities"])), " ".join(p["addresses"]),
                          human_time(p["last_seen_at"]) if p["last_seen_at"] else "never")
        if not peers:
            console.print("no peers")
        else:
            console.print(table)
        return 0

    return _run(go())


async def _resolve_handle(node: NodeClient, text: str) -> str:
    try:
        return str(DistributionHandle.parse(text))  # a full handle goes as is
    except ValueError:
        return await node.resolve_handle(text)


def _target_state(s: DistributionStatus, t: TargetStatus, now: float) -> str:
    """What a target is doing, as people read it: a transferring target that has not moved
    yet is queued (behind higher priorities), one that stopped moving is stalled."""
    if t.state is TargetState.TRANSFERRING:
        if t.bytes_done == 0 and not t.rate:
            return "queued"
        if not t.rate and now - t.updated > STALLED_AFTER:
            return "stalled"
    return str(t.state)


def _eta(s: DistributionStatus, t: TargetStatus) -> str:
    if t.state is not TargetState.TRANSFERRING or not t.rate:
        return ""
    return human_duration(max(0, s.size - t.bytes_done) / t.rate)


def render_status(s: DistributionStatus) -> Table:
    now = time.time()
    elapsed = (s.finished or now) - s.started
    # scopes (cap:arch in [a,b]), the priority in brackets and reasons are text, not markup
    table = Table(title=escape(f"{s.handle}  {s.blob_id.short()}…  {human_bytes(s.size)}  "
                               f"to {s.scope}  [{s.priority}]  {s.state}  "
                               f"{s.completed}/{s.total} done  {human_duration(elapsed)}  "
                               f"started {human_time(s.started)}"),
                  title_justify="left")
    table.add_column("target")
    table.add_column("state")
    table.add_column("progress", justify="right")
    table.add_column("rate", justify="right")
    table.add_column("eta", justify="right")
    table.add_column("note")
    for t in s.targets:
        pct = 100.0 * t.bytes_done / s.size if s.size else 100.0
        bar_len = 20
        filled = int(bar_len * min(pct, 100) / 100)
        state = _target_state(s, t, now)
        style = {"completed": "green", "failed": "red", "cancelled": "yellow",
                 "stalled": "yellow", "queued": "dim"}.get(state, "")
        moving = t.state is TargetState.TRANSFERRING and t.rate
        table.add_row(t.node.short() + "…", f"[{style}]{state}[/]" if style else state,
                      "█" * filled + "░" * (bar_len - filled) + f" {pct:5.1f}%",
                      f"{human_bytes(t.rate)}/s" if moving else "", _eta(s, t),
                      escape(t.reason[:60]))
    return table


def _check_scope(text: str) -> bool:
    """Fail on a malformed scope before any work; whether it names nodes by id prefixes
    (resolved against the running node's peers)."""
    try:
        Scope.parse(text)
    except ScopeError as exc:
        if text.strip().startswith("cap:"):  # most likely a > or < the shell took
            raise ScopeError(f"{exc} (quote cap: scopes in a shell, where > and < are "
                             "redirections: --to 'cap:gpu=true,mem_gb>=16')") from None
        raise
    except InvalidIdError:
        if text.strip().startswith("node:"):
            return True
        raise
    return False


async def _resolve_scope(node: NodeClient, text: str) -> str:
    """``node:ID[,ID]`` with each unique prefix of a known node id (the running node's
    peers, or itself) replaced by the full id, as tables show ids cut short."""
    from blobmesh.node.ids import resolve_prefix

    ids = [p.strip() for p in text.strip().removeprefix("node:").split(",") if p.strip()]
    known = [str(p["node"]) for p in await node.peers()] + [str((await node.node())["node"])]
    out = []
    for i in ids:
        try:
            out.append(str(NodeId.parse(i)))
        except InvalidIdError:
            out.append(resolve_prefix(i if i.startswith(NodeId.PREFIX) else NodeId.PREFIX + i,
                                      known, "node"))
    return "node:" + ",".join(out)


def cmd_distribute(args: argparse.Namespace) -> int:
    by_prefix = _check_scope(args.to)
    if args.quiet and args.json:
        raise BlobmeshError("--quiet and --json exclude each other")
    home = _home(args)

    async def go() -> int:
        async with NodeClient(home) as node:
            await node.node()  # a running node first: no copy into the store for nothing
            scope = await _resolve_scope(node, args.to) if by_prefix else args.to
            blob_id = await asyncio.to_thread(_blob_for, home, args.what, args.quiet)
            status, created = await node.distribute_or_join(
                str(blob_id), scope, args.priority, args.share_url, new=args.new,
                export=args.export, export_force=args.export_force)
            handle = str(status.handle)
            if args.quiet:
                print(handle, flush=True)
            elif not args.json:
                verb = "started" if created else "already active (use --new for another)"
                console.print(f"distribution {handle} {verb}: {status.total} target(s); "
                              f"follow it with: blobmesh status {handle} --follow",
                              highlight=False, soft_wrap=True)
            if not args.wait:
                if args.json:
                    print_json(status_to_json(status))
                return 0
            final = await _follow(node, handle, args.timeout, not (args.json or args.quiet),
                                  as_json=args.json)
            if args.json:
                print_json(status_to_json(final))
            return 0 if final.done and final.failed == 0 and \
                final.completed == final.total else 1

    return _run(go())


def _blob_for(home: Path, what: str, quiet: bool) -> BlobId:
    path = Path(what)
    with Store(home) as store:
        if not path.exists():
            try:
                return resolve_blob(store, what)
            except InvalidIdError:
                raise InvalidIdError(f"{what!r} is neither an existing file nor a blob id "
                                     "(or unique prefix of one) in this store") from None
        if path.is_dir():  # a directory goes as a collection
            from blobmesh.collection import add_tree

            added = add_tree(store, path)
            if not quiet:
                err_console.print(f"added {path}/ as collection {added.collection_id} "
                                  f"({len(added.collection.entries)} entries)",
                                  highlight=False, markup=False)
            return added.collection_id
        info = store.add_path(path)
    if not quiet:
        err_console.print(f"added {path} as {info.blob_id}", highlight=False, markup=False)
    return info.blob_id


async def _follow(node: NodeClient, handle: str, timeout: float | None, live: bool, *,
                  as_json: bool = False) -> DistributionStatus:
    """Show progress until done; on Ctrl-C or a timeout say that the distribution goes on
    (with ``as_json``, the last status still goes to stdout)."""
    status = await node.status(handle)
    if not status.done:
        err_console.print(f"following {handle}; Ctrl-C stops following, not the distribution",
                          highlight=False, markup=False, soft_wrap=True)

    async def watch() -> None:
        nonlocal status
        if not live:  # --json, -q: no progress table on stderr either
            async for s in node.events(handle):
                status = s
            return
        with Live(render_status(status), console=err_console, refresh_per_second=8,
                  transient=False) as view:
            async for s in node.events(handle):
                status = s
                view.update(render_status(s))

    try:
        await asyncio.wait_for(watch(), timeout)
    except TimeoutError:
        if as_json:
            print_json(status_to_json(status))
        raise BlobmeshError(
            f"distribution {handle} not finished after {timeout}s: {status.completed}/"
            f"{status.total} targets completed; it goes on (follow it with: blobmesh status "
            f"{handle} --follow)", handle=handle) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        # asyncio.run turns Ctrl-C into our cancellation: the CLI's end, said as such
        if as_json:
            print_json(status_to_json(status))
        raise StoppedFollowingError(
            f"stopped following; distribution {handle} goes on (follow it with: blobmesh "
            f"status {handle} --follow, stop it with: blobmesh cancel {handle})",
            handle=handle) from None
    return status


class StoppedFollowingError(BlobmeshError):
    """Ctrl-C while following a distribution: the CLI stops, the distribution does not."""

    exit_code = 130


def _print_status(status: DistributionStatus, as_json: bool) -> None:
    if as_json:
        print_json(status_to_json(status))
    else:
        console.print(render_status(status))


def cmd_distributions(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with NodeClient(_home(args)) as node:
            if args.action == "prune":
                pruned = await node.prune()
                if args.json:
                    print_json({"pruned": pruned})
                else:
                    console.print(f"pruned {len(pruned)} finished distribution(s)")
                return 0
            items = await node.distributions(active=args.active)
        if args.json:
            print_json([status_to_json(s) for s in items])
            return 0
        if not items:
            console.print("no active distributions" if args.active else "no distributions")
            return 0
        console.print(render_distributions(items, time.time()))
        return 0

    return _run(go())


def render_distributions(items: list[DistributionStatus], now: float) -> Table:
    """The ``distributions`` table: one row each, queued when every target still to go is,
    the ETA of the slowest moving target."""
    table = Table("handle", "state", "done", "size", "blob", "scope", "priority",
                  "started", "eta")
    for s in items:
        etas = [max(0, s.size - t.bytes_done) / t.rate for t in s.targets
                if t.state is TargetState.TRANSFERRING and t.rate]
        state = str(s.state)
        if not s.done and all(_target_state(s, t, now) == "queued" for t in s.targets
                              if not t.state.final):
            state = "queued"
        table.add_row(str(s.handle), state, f"{s.completed}/{s.total}", human_bytes(s.size),
                      s.blob_id.short() + "…", escape(str(s.scope)), str(s.priority),
                      human_time(s.started), human_duration(max(etas)) if etas else "")
    return table


def cmd_status(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with NodeClient(_home(args)) as node:
            handle = await _resolve_handle(node, args.handle)
            if args.follow:
                status = await _follow(node, handle, None, not args.json, as_json=args.json)
                if args.json:
                    print_json(status_to_json(status))
                return 0
            _print_status(await node.status(handle), args.json)
        return 0

    return _run(go())


def cmd_cancel(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with NodeClient(_home(args)) as node:
            handle = await _resolve_handle(node, args.handle)
            _print_status(await node.cancel(handle), args.json)
        return 0

    return _run(go())


__all__ = ["register", "render_distributions", "render_status"]
