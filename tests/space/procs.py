"""Runner processes (``python -m blobmesh.space.runner``) driven over stdin/stdout."""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class RunnerProc:
    """One runner process hosting ``nodes`` space nodes."""

    def __init__(self, home: Path, nodes: int = 1, *, bootstrap: list[str] | None = None,
                 extra: list[str] | None = None, wait: bool = True,
                 prefix: list[str] | None = None) -> None:
        cmd = [*(prefix or []), sys.executable, "-m", "blobmesh.space.runner", "--home", str(home),
               "--nodes", str(nodes), *(extra or [])]
        for t in bootstrap or []:
            cmd += ["--bootstrap", t]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.nodes = nodes
        self.lines: queue.Queue[str] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self.tickets: list[str] = []
        self.tickets_at = 0.0  # when the last ticket was printed (nodes started, joining)
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        if wait:
            self.wait_ready()

    def wait_ready(self, within: float = 60.0) -> None:
        if not self._ready.wait(within) or len(self.tickets) < self.nodes:
            raise RuntimeError("runner did not print its tickets")

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("bmt1"):
                self.tickets.append(line.strip())
                if len(self.tickets) == self.nodes:
                    self.tickets_at = time.time()
                    self._ready.set()
                continue
            msg = json.loads(line)
            if "event" in msg:
                self.events.append(msg)
            else:
                self.lines.put(line)
        self._ready.set()  # exited: let waiters see the missing tickets

    def call(self, within: float = 10.0, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self.lines.get(timeout=within))
        return reply

    def status(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self.call(cmd="status")["status"]
        return nodes

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(queue.Empty, BrokenPipeError, OSError):
                self.call(cmd="quit", within=1)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_for(cond: Callable[[], bool], within: float, step: float = 0.2) -> float:
    """Poll ``cond`` until true; returns the seconds it took (fails after ``within``)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > within:
            raise AssertionError("condition not reached in time")
        time.sleep(step)
    return time.monotonic() - t0
