"""A local fleet of real ``blobmesh node run`` processes (for the demo, tests and benchmarks)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blobmesh.errors import BlobmeshError


@dataclass(eq=False)
class FleetNode:
    index: int
    home: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    ticket: str = ""
    logs: list[Path] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)  # of the last start, for restart()

    @property
    def node_id(self) -> str:
        from blobmesh.transport import Ticket

        return str(Ticket.parse(self.ticket).node_id)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        """Everything this node's processes wrote to stderr (their logs), oldest first."""
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


class Fleet:
    """Node processes, each with its own home under ``root``, bootstrapped from the first
    running one."""

    def __init__(self, root: Path, *, listen_host: str = "127.0.0.1") -> None:
        self.root = root
        self.listen_host = listen_host
        self.nodes: list[FleetNode] = []

    def add(self, *, groups: Sequence[str] = (), caps: Sequence[str] = (),
            extra: Sequence[str] = ()) -> FleetNode:
        """Declare a node (not started yet)."""
        i = len(self.nodes)
        args = ["--listen", f"{self.listen_host}:0"]
        for g in groups:
            args += ["--group", g]
        for c in caps:
            args += ["--cap", c]
        node = FleetNode(i, self.root / f"node{i}", [*args, *extra])
        self.nodes.append(node)
        return node

    def _popen(self, node: FleetNode) -> None:
        if not node.cmd:
            node.cmd = [sys.executable, "-m", "blobmesh.cli.main", "--home", str(node.home),
                        "node", "run", *node.args]
            seed = next((n for n in self.nodes if n.running and n is not node and n.ticket),
                        None)
            if seed is not None:
                node.cmd += ["--bootstrap", seed.ticket]
        cmd = node.cmd
        log_path = self.root / f"node{node.index}.{len(node.logs)}.log"
        node.logs.append(log_path)
        with open(log_path, "wb") as log:
            node.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                         stdin=subprocess.DEVNULL)

    def _read_ticket(self, node: FleetNode) -> None:
        assert node.proc is not None and node.proc.stdout is not None
        line = node.proc.stdout.readline().decode().strip()
        if not line:
            node.proc.wait()
            tail = node.logs[-1].read_text()[-2000:]
            raise BlobmeshError(f"node {node.index} failed to start:\n{tail}")
        node.ticket = line

    def start(self, nodes: Sequence[FleetNode] | None = None) -> None:
        """Start nodes (all not yet running by default); the first one before the others."""
        todo = [n for n in (nodes or self.nodes) if not n.running]
        for n in todo:
            n.cmd = []  # bootstrap from whichever node runs now
        if todo and todo[0].index == 0:
            self._popen(todo[0])
            self._read_ticket(todo[0])
            todo = todo[1:]
        for n in todo:
            self._popen(n)
        for n in todo:
            self._read_ticket(n)

    def tracebacks(self) -> list[str]:
        """The logs of nodes that logged a traceback (normal use must not)."""
        return [f"node {n.index}:\n{n.stderr()}" for n in self.nodes
                if "Traceback" in n.stderr()]

    def restart(self, node: FleetNode) -> None:
        """SIGTERM ``node`` (it leaves the space), then start it with the very same command."""
        self.terminate([node])
        self._popen(node)
        self._read_ticket(node)

    async def wait_converged(self, timeout: float = 30.0) -> None:
        """Wait until every running node sees every other running node alive in the space."""
        from blobmesh.node.client import NodeClient

        running = [n for n in self.nodes if n.running]

        async def sees_all(node: FleetNode) -> None:
            async with NodeClient(node.home) as client:
                while True:  # other processes' state: nothing to wait on but polling
                    if sum(bool(p["alive"]) for p in await client.peers()) >= len(running) - 1:
                        return
                    await asyncio.sleep(0.05)

        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(sees_all(n) for n in running))
        except TimeoutError:
            raise BlobmeshError(f"the fleet did not converge within {timeout}s") from None

    def kill(self, node: FleetNode) -> None:
        """SIGKILL: no goodbye, no cleanup."""
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()

    def stop(self) -> None:
        """SIGTERM every node (each leaves the space), then wait for them."""
        self.terminate(self.nodes)

    def terminate(self, nodes: Sequence[FleetNode]) -> None:
        """SIGTERM ``nodes`` (each leaves the space) and wait for them to exit."""
        for n in nodes:
            if n.running:
                assert n.proc is not None
                n.proc.send_signal(signal.SIGTERM)
        for n in nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait()
                if n.proc.stdout is not None:
                    n.proc.stdout.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
