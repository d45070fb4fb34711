"""A space member whose swarm misbehaves (for ``bench_swarm --hostile`` and ``probe_trust``).

    python benchmarks/hostile_node.py MODE --home H --listen ADDR [--bootstrap TICKET]

Runs ``tests/distribution/hostile.py``'s :func:`hostile_node` as a process that prints its
ticket first like ``node run`` and stops on SIGTERM: a ``black-hole`` claims every piece and
answers no request, a ``non-reader`` asks every member for every piece of each distributed blob
and reads nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from blobmesh.node.daemon import NodeConfig
from blobmesh.transport import Ticket
from blobmesh.transport.ticket import parse_listen_address

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.distribution.hostile import MODES, hostile_node


async def run(args: argparse.Namespace) -> None:
    cfg = NodeConfig(home=Path(args.home), listen=parse_listen_address(args.listen),
                     bootstrap=tuple(Ticket.parse(t) for t in args.bootstrap))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with hostile_node(cfg, args.mode) as (node, _):
        print(node.ticket, flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--home", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--bootstrap", action="append", default=[])
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
