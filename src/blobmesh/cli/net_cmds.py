"""Network commands: ticket."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from blobmesh.store.layout import default_home
from blobmesh.transport import Address, Identity, Ticket, parse_address
from blobmesh.transport.endpoint import DEFAULT_PORT, advertised_addresses


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help = ("print this node's ticket (node id + addresses): the running node's, else one "
            "built from --addr or the port the node last listened on, creating the identity "
            "if needed")
    p = sub.add_parser("ticket", help=help, description=help)
    p.set_defaults(handler=cmd_ticket)
    p.add_argument("--addr", action="append", type=parse_address, metavar="HOST:PORT",
                   help="address to put in the ticket (repeatable; default: this host's "
                        "addresses on the port the node last listened on, else "
                        f"{DEFAULT_PORT})")
    p.add_argument("--id", action="store_true", help="print only the node id")


def cmd_ticket(args: argparse.Namespace) -> int:
    home = args.home or default_home()
    identity = Identity.load_or_create(home)
    if args.id:
        sys.stdout.write(f"{identity.node_id}\n")
        return 0
    if not args.addr:
        running = asyncio.run(_running_ticket(home))
        if running is not None:  # the addresses the node really listens on
            sys.stdout.write(f"{running}\n")
            return 0
    addrs: list[Address] = args.addr
    if not addrs:  # no node runs: the port it listened on last (it keeps it), else the default
        from blobmesh.node.home import NodeState

        port = NodeState.load(home).listen_port or DEFAULT_PORT
        addrs = advertised_addresses("0.0.0.0", port)
        sys.stderr.write(f"no node is running on {home}: a ticket for this host's addresses "
                         f"on port {port}\n")
    sys.stdout.write(f"{Ticket.create(identity.node_id, addrs)}\n")
    return 0


async def _running_ticket(home: Path) -> str | None:
    from blobmesh.node.client import NodeClient, NodeNotRunningError

    try:
        async with NodeClient(home) as node:
            return str((await node.node())["ticket"])
    except NodeNotRunningError:
        return None
