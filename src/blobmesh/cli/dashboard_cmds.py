"""``blobmesh dashboard`` (open the running node's web page) and ``blobmesh top`` (the same
data in a full-screen terminal view)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import webbrowser
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blobmesh.cli.output import (
    Subcommands,
    add_command,
    caps_text,
    console,
    err_console,
    human_bytes,
    human_duration,
)
from blobmesh.errors import BlobmeshError

if TYPE_CHECKING:
    from rich.console import Group

# The node client (aiohttp) and the dashboard are imported by the commands that use them:
# every ``blobmesh`` command imports this module to list its subcommands.


def _home(args: argparse.Namespace) -> Path:
    from blobmesh.store import default_home

    return Path(args.home) if args.home else default_home()


def register(sub: Subcommands) -> None:
    p = add_command(sub, "dashboard", cmd_dashboard,
                    "open the running node's web dashboard (prints its URL without a browser)")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="only print the URL")
    p = add_command(sub, "top", cmd_top,
                    "full-screen live view of the fleet and distributions (q quits)")
    p.add_argument("--interval", type=_positive, default=1.0, metavar="S",
                   help="seconds between refreshes (default: 1)")


class DashboardNotServedError(BlobmeshError):
    """The running node was started without ``--http-listen``."""

    exit_code = 2


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def dashboard_url(home: Path) -> str:
    """The URL of the running node's dashboard, with its token unless it listens on
    loopback."""
    from blobmesh.dashboard.auth import is_loopback
    from blobmesh.dashboard.server import read_url_file
    from blobmesh.node.client import NodeNotRunningError

    info = read_url_file(home)
    if info is None:
        if (home / "control.sock").exists():
            raise DashboardNotServedError(f"the node of home {home} serves no dashboard "
                                          f"(start it with --http-listen 127.0.0.1:PORT)",
                                          home=str(home))
        raise NodeNotRunningError(f"no node is running for home {home}")
    url = str(info["url"])
    host = url.split("//", 1)[1].rsplit(":", 1)[0]
    return url if is_loopback(host) else f"{url}?token={info['token']}"


def _graphical() -> bool:
    """Whether webbrowser would open a window (not a text browser in this terminal)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def cmd_dashboard(args: argparse.Namespace) -> int:
    url = dashboard_url(_home(args))
    if not args.print_only and _graphical() and webbrowser.open(url):
        err_console.print(f"opened {url}", highlight=False)
    else:
        sys.stdout.write(url + "\n")
    return 0


# --- top -------------------------------------------------------------------------------------

_STYLE = {"alive": "green", "suspect": "yellow", "dead": "red", "completed": "green",
          "failed": "red", "finished-with-failures": "red", "cancelled": "bright_black",
          "active": "cyan", "transferring": "cyan"}


FLEET_SHOWN = 50  # members listed (a screen shows fewer)


def _rate(n: float | None) -> str:
    return "—" if n is None else (f"{human_bytes(n)}/s" if n > 0 else "")


def _bar(frac: float, width: int = 16) -> str:
    filled = int(width * min(1.0, frac))
    return "█" * filled + "░" * (width - filled) + f" {100 * frac:5.1f}%"


def _metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def _store(row: Mapping[str, Any], now: float) -> str:
    """A member's store usage as its stats row (``GET /v1/peers/stats``) has it."""
    if row.get("stats") == "ok":
        return "—" if row["store_bytes"] is None else \
            f"{human_bytes(row['store_bytes'])} ({row['store_blobs']})"
    if row.get("stats") == "asking":
        return "…"
    if row.get("stats") == "unknown":
        seen = row.get("stats_seen")
        return f"unknown (last seen {now - seen:.0f}s ago)" if seen else \
            "unknown (never answered)"
    return "—"


def shown_peers(peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The members ``top`` lists (and asks for their stats), at most ``FLEET_SHOWN``."""
    return sorted(peers, key=lambda p: str(p["node"]))[:FLEET_SHOWN]


def render_top(node: Mapping[str, Any], peers: list[dict[str, Any]],
               statuses: list[dict[str, Any]], me: Mapping[str, float],
               stats: Mapping[str, Mapping[str, Any]], now: float) -> Group:
    """The whole screen of ``blobmesh top`` from the control API's JSON (``stats``: the
    members' rows of ``GET /v1/peers/stats``, by node id)."""
    from rich.console import Group
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from blobmesh.dashboard.model import liveness, summarize, target_rates

    head = Text.assemble(
        ("blobmesh top  ", "bold"), f"node {node['node'][:16]}…  v{node['version']}  "
        f"space {node['space']}  store {human_bytes(me.get('store', 0))}  "
        f"up {_rate(me.get('up', 0)) or '0'}  down {_rate(me.get('down', 0)) or '0'}   ",
        ("q quits", "dim"))
    downs = target_rates(statuses)
    shown = shown_peers(peers)
    more = f" (the first {len(shown)} listed)" if len(shown) < len(peers) else ""
    fleet = Table("member", "liveness", "last heard", "addresses", "groups", "capabilities",
                  "store", "up", "down", title=f"fleet: {len(peers) + 1} members{more}",
                  title_justify="left", expand=True)
    fleet.add_row(node["node"][:16] + "…", "[green]alive[/]", "this node", "",
                  escape(",".join(node["groups"])), escape(caps_text(node["capabilities"])),
                  human_bytes(me.get("store", 0)), _rate(me.get("up", 0)),
                  _rate(me.get("down", 0)))
    for p in shown:
        seen = float(p["last_seen_at"] or 0.0)  # null: never heard from
        state = liveness(bool(p["alive"]), seen, now)
        heard = f"{now - seen:.0f}s ago" if seen else "never"
        row = stats.get(p["node"], {})
        down = row.get("down")  # else what it reports of the downloads from here
        fleet.add_row(p["node"][:16] + "…", f"[{_STYLE[state]}]{state}[/]", heard,
                      " ".join(p["addresses"]), escape(",".join(p["groups"])),
                      escape(caps_text(p["capabilities"])),
                      _store(row, now), _rate(row.get("up")),
                      _rate(downs.get(p["node"], 0.0) if down is None else down))
    dists = Table(title=f"distributions: {len(statuses)}", title_justify="left", expand=True)
    for name in ("handle", "blob", "scope", "prio", "state", "targets", "progress", "rate",
                 "ETA"):
        dists.add_column(name, no_wrap=name in ("handle", "state", "progress"))
    for s in statuses[:30]:
        row = summarize(s, now)
        frac = row["bytes_done"] / row["bytes_total"] if row["bytes_total"] else \
            float(row["state"] == "completed")
        style = _STYLE.get(row["state"], "")
        dists.add_row(row["handle"], row["blob"][:14] + "…", escape(row["scope"]),
                      row["priority"],
                      f"[{style}]{row['state']}[/]", f"{row['completed']}/{row['targets']}",
                      _bar(frac), _rate(row["rate"]),
                      human_duration(row["eta"]) if row["eta"] is not None else "")
    return Group(Panel(head), fleet, dists)


@contextlib.contextmanager
def _keys(on_quit: asyncio.Event) -> Iterator[None]:
    """Set ``on_quit`` when ``q`` is typed (stdin in cbreak mode while the view runs)."""
    if not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def read() -> None:
        if os.read(fd, 32).lower().startswith(b"q"):
            on_quit.set()

    tty.setcbreak(fd)
    loop.add_reader(fd, read)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def cmd_top(args: argparse.Namespace) -> int:
    from rich.live import Live

    from blobmesh.dashboard.model import RateMeter
    from blobmesh.node.client import NodeClient
    from blobmesh.node.codec import status_to_json

    async def go() -> int:
        up, down = RateMeter(), RateMeter()
        quit_ = asyncio.Event()
        async with NodeClient(_home(args)) as client:
            node = await client.node()
            with _keys(quit_), Live(console=console, screen=True, auto_refresh=False) as live:
                while not quit_.is_set():
                    peers, dists, metrics = await asyncio.gather(
                        client.peers(), client.distributions(), client.metrics())
                    stats = {r["node"]: r for r in await client.peer_stats(
                        [str(p["node"]) for p in shown_peers(peers)])}
                    now = time.time()
                    m = _metrics(metrics)
                    me = {"store": m.get("blobmesh_store_bytes", 0.0),
                          "up": up.update(now, int(m.get(
                              "blobmesh_swarm_uploaded_bytes_total", 0))),
                          "down": down.update(now, int(m.get(
                              "blobmesh_swarm_downloaded_bytes_total", 0)))}
                    live.update(render_top(node, peers, [status_to_json(s) for s in dists],
                                           me, stats, now), refresh=True)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(quit_.wait(), args.interval)
        return 0

    return asyncio.run(go())


__all__ = ["dashboard_url", "register", "render_top"]
