"""Space commands: bootstrap-server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from blobmesh.cli.output import Subcommands, add_command
from blobmesh.space.bootstrap import BootstrapServer, serve_bootstrap
from blobmesh.space.runner import parse_listen


def register(sub: Subcommands) -> None:
    p = add_command(sub, "bootstrap-server", cmd_bootstrap_server,
                    "run a bootstrap server: nodes put their signed record, get a random "
                    "sample back")
    p.add_argument("--listen", default="127.0.0.1:4920", metavar="HOST:PORT",
                   help="address to serve on (default 127.0.0.1:4920)")
    p.add_argument("--max-records", type=int, default=10_000, metavar="N",
                   help="records kept per space (default 10000)")
    p.add_argument("--max-spaces", type=int, default=1000, metavar="N",
                   help="spaces served at most (default 1000)")


def cmd_bootstrap_server(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)

    async def run() -> None:
        server = BootstrapServer(max_records=args.max_records, max_spaces=args.max_spaces)
        runner = await serve_bootstrap(server, host, port)
        try:
            for site in runner.sites:
                print(site.name, flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0
