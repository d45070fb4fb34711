"""Runner processes (``python -m blobmesh.space.runner``) driven over stdin/stdout."""

from __future__ import annotations

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
                 extra: list[str] | None = None) -> None:
        cmd = [sys.executable, "-m", "blobmesh.space.runner", "--home", str(home),
               "--nodes", str(nodes), *(extra or [])]
        for t in bootstrap or []:
            cmd += ["--bootstrap", t]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self.tickets = [self._read_line(30) for _ in range(nodes)]
        threading.Thread(target=self._pump, daemon=True).start()

    def _read_line(self, within: float) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("runner exited before printing its tickets")
        return line.strip()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "event" in msg:
                self.events.append(msg)
            else:
                self.lines.put(line)

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
            try:
                self.call(cmd="quit", within=1)
            except (queue.Empty, BrokenPipeError, OSError):
                pass
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
