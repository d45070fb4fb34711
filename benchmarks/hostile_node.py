"""A space member whose swarm misbehaves (for ``bench_swarm --hostile``).

    python benchmarks/hostile_node.py MODE --home H --listen ADDR [--bootstrap TICKET]

Runs a real node (space membership, control socket, prints its ticket first like
``node run``) but takes no part in distributions; its swarm streams are served by
``tests/distribution/hostile.py``'s :class:`HostilePeer` instead: a ``black-hole`` claims every
piece and answers no request, a ``non-reader`` asks every member for every piece of each
distributed blob and reads nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import msgspec

from blobmesh.distribution.service import OP_REQUEST, RequestOp
from blobmesh.errors import BlobmeshError
from blobmesh.hashing import BlobId
from blobmesh.node.daemon import Node, NodeConfig
from blobmesh.tasks import TaskOwner
from blobmesh.transport import Ticket
from blobmesh.transport.identity import NodeId
from blobmesh.transport.ticket import parse_listen_address

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.distribution.hostile import MODES, HostilePeer


async def run(args: argparse.Namespace) -> None:
    cfg = NodeConfig(home=Path(args.home), listen=parse_listen_address(args.listen),
                     bootstrap=tuple(Ticket.parse(t) for t in args.bootstrap))
    node = Node(cfg)
    await node.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        print(node.ticket, flush=True)
        await node.distribution.aclose()  # no downloads of its own: only the misbehaviour
        hostile = HostilePeer(node.endpoint, args.mode)  # takes over the swarm protocol
        async with TaskOwner("hostile") as tasks:
            if args.mode == "non-reader":
                tasks.spawn(attack_every_distribution(node, hostile, tasks), name="watch")
            await stop.wait()
    finally:
        await node.aclose(leave=False)


async def attack_every_distribution(node: Node, hostile: HostilePeer, tasks: TaskOwner) -> None:
    async for op in node.space.watch_ops([OP_REQUEST]):
        request = msgspec.msgpack.decode(op.payload, type=RequestOp)
        blob = BlobId(request.blob)
        for member in node.space.members():
            peer: NodeId = member.node_id
            if peer != node.identity.node_id:
                tasks.spawn(attack(hostile, peer, blob, request), name=f"attack-{peer.short()}")


async def attack(hostile: HostilePeer, peer: NodeId, blob: BlobId, request: RequestOp) -> None:
    with contextlib.suppress(BlobmeshError):  # it is refused, reset and banned: as it should
        await hostile.attack(peer, blob, request.size, request.piece_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--home", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--bootstrap", action="append", default=[])
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
