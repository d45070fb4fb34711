"""Run one or more space nodes over the TLS transport, driven by JSON lines on stdin.

Used by the integration tests and the benchmark (until then ``blobmesh node run`` owns a
space in production)::

    python -m blobmesh.space.runner --home DIR [--nodes N] [--bootstrap TICKET]...

prints each node's ticket alone on a line first, then answers commands (one JSON object per
line: ``status``, ``publish``, ``load``, ``leave``, ``quit``) and, with ``--events``, reports
every ``test`` op stored as ``{"event": "op", "node": I, "id": ..., "t": UNIX_TIME}`` and, with
``--expect N``, when each node first knows all ``N - 1`` others (``"event": "full"``) and when
it first holds them all alive (``"event": "alive"``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from blobmesh.errors import BlobmeshError, InvalidIdError
from blobmesh.space.config import Seed, SpaceConfig, Timing
from blobmesh.space.predicate import parse_capability
from blobmesh.space.space import Space, endpoint_address_book
from blobmesh.transport import (
    Endpoint,
    Identity,
    Ticket,
    TransportConfig,
    format_address,
)

KINDS = ("test", "bench")
# generous timeouts: tests share two cores, and a starved event loop is not a dead node
FAST = Timing(gossip_interval=0.3, probe_interval=0.2, probe_timeout=1.0, indirect_timeout=1.5,
              suspicion_timeout=2.0, maintenance_interval=0.5, request_timeout=3.0,
              unresponsive_backoff_max=2.0)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` to listen on; unlike a ticket address, port 0 and wildcards are fine."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidIdError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.nodes: list[tuple[Endpoint, Space]] = []
        self.done = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        a = self.args
        caps = dict(parse_capability(c) for c in a.cap)
        seeds = tuple(Seed.from_ticket(Ticket.parse(t)) for t in a.bootstrap)
        timing = FAST if a.fast else Timing()
        if a.gossip_interval:
            timing = dataclasses.replace(timing, gossip_interval=a.gossip_interval)
        host, port = parse_listen(a.listen or "127.0.0.1:0")
        # space messages are small: small frames keep per-connection buffers small
        transport = TransportConfig(max_frame_size=a.frame_kib * 1024)
        for i in range(a.nodes):
            ident = Identity.load_or_create(Path(a.home) / f"n{i}")
            ep = await Endpoint.start(ident, (host, port if i == 0 else 0), transport)
            cfg = SpaceConfig(
                name=a.space, secret=a.secret, groups=tuple(a.group), capabilities=caps,
                addresses=tuple(format_address(x) for x in ep.ticket.addrs),
                seeds=seeds or tuple(Seed.from_ticket(e.ticket) for e, _ in self.nodes[:1]),
                bootstrap_urls=tuple(a.bootstrap_url), timing=timing)
            space = Space(cfg, ident, ep, Path(a.home) / f"n{i}" / "space.sqlite",
                          address_book=endpoint_address_book(ep.add_peer_addresses))
            for k in KINDS:
                space.register_op_kind(k)
            await space.start()
            self.nodes.append((ep, space))
            print(ep.ticket, flush=True)
        await asyncio.gather(*(s.join() for _, s in self.nodes))
        loop = asyncio.get_running_loop()
        for i, (_, s) in enumerate(self.nodes):
            if a.events:
                self.tasks.add(loop.create_task(self._watch(i, s)))
            if a.expect:
                self.tasks.add(loop.create_task(self._watch_full(i, s, a.expect)))

    async def _watch(self, i: int, space: Space) -> None:
        async for op in space.subscribe("test"):
            _emit({"event": "op", "node": i, "id": str(op.id), "t": time.time()})

    async def _watch_full(self, i: int, space: Space, expect: int) -> None:
        known = False
        while True:
            if not known and len(space.peers(alive_only=False)) >= expect - 1:
                known = True
                _emit({"event": "full", "node": i, "t": time.time()})
            if known and len(space.peers()) >= expect - 1:
                _emit({"event": "alive", "node": i, "t": time.time()})
                return
            await asyncio.sleep(0.02)

    def status(self) -> dict[str, Any]:
        out = []
        for _, s in self.nodes:
            alive = s.peers()
            everyone = s.peers(alive_only=False)
            out.append({"node": str(s.node_id), "alive": len(alive), "known": len(everyone),
                        "unresponsive": [str(p.node_id) for p in everyone if not p.alive],
                        "left": [str(r.node_id) for r in s.peer_store if r.tombstone],
                        "ops": len(s.op_store), "metrics": s.metrics.snapshot()})
        return {"status": out, "rss_kb": _rss_kb(), "t": time.time()}

    async def command(self, cmd: dict[str, Any]) -> None:
        name = cmd.get("cmd")
        space = self.nodes[int(cmd.get("node", 0))][1]
        if name == "status":
            _emit(self.status())
        elif name == "publish":
            t0 = time.time()
            op = await space.publish(cmd.get("kind", "test"), cmd.get("payload", "").encode())
            _emit({"published": str(op.id), "t": t0})
        elif name == "load":
            # the same pre-signed records (of the ops' authors: only members' ops count) and
            # ops into every node here, as if gossip had delivered them
            data = await asyncio.to_thread(Path(cmd["path"]).read_bytes)
            records, raws = msgspec.msgpack.decode(data, type=tuple[list[bytes], list[bytes]])
            for _, s in self.nodes:
                s.add_records(records)
                s.add_ops(raws)
            _emit({"loaded": len(raws)})
        elif name == "leave":
            await space.leave()
            _emit({"left": str(space.node_id)})
        elif name == "quit":
            self.done.set()
        else:
            _emit({"error": f"unknown command {name!r}"})

    async def stdin_loop(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while not self.done.is_set():
            line = await reader.readline()
            if not line:
                break
            try:
                await self.command(json.loads(line))
            except (BlobmeshError, ValueError, KeyError, IndexError) as exc:
                _emit({"error": str(exc)})
        self.done.set()

    async def aclose(self) -> None:
        for t in self.tasks:
            t.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                await asyncio.gather(*(s.leave() for _, s in self.nodes))
        for ep, s in self.nodes:
            await s.aclose()
            await ep.aclose()


async def _main(args: argparse.Namespace) -> None:
    runner = Runner(args)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, runner.done.set)
    try:
        await runner.start()
        stdin = loop.create_task(runner.stdin_loop())
        await runner.done.wait()
        stdin.cancel()
    finally:
        await runner.aclose()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m blobmesh.space.runner")
    p.add_argument("--home", required=True)
    p.add_argument("--listen", default="", metavar="HOST:PORT")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--bootstrap", action="append", default=[], metavar="TICKET")
    p.add_argument("--bootstrap-url", action="append", default=[], metavar="URL")
    p.add_argument("--group", action="append", default=[])
    p.add_argument("--cap", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--space", default="default")
    p.add_argument("--secret-file")
    p.add_argument("--fast", action="store_true", help="short periods, for tests")
    p.add_argument("--gossip-interval", type=float, default=0.0)
    p.add_argument("--events", action="store_true")
    p.add_argument("--frame-kib", type=int, default=64, help="transport max frame size")
    p.add_argument("--expect", type=int, default=0, metavar="N",
                   help="report when each node knows N-1 peers")
    args = p.parse_args(argv)
    args.secret = Path(args.secret_file).read_bytes().strip() if args.secret_file else None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
