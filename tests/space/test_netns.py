"""A real network partition and its healing: runner processes in network namespaces.

Two namespaces hang off a bridge that lives in a third (so the host's own namespace is left
alone); cutting one namespace's veth partitions the fleet, bringing it back up heals it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.space.procs import RunnerProc, wait_for

pytestmark = [
    pytest.mark.root, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                       reason="needs root and iproute2 for network namespaces"),
]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Net:
    """Namespaces ``<tag>a`` and ``<tag>b`` on a bridge inside ``<tag>sw``."""

    def __init__(self) -> None:
        self.tag = f"bmsp{os.getpid() % 100000}"
        self.sw = self.tag + "sw"
        self.subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
        ip("netns", "add", self.sw)
        ip("-n", self.sw, "link", "add", "br0", "type", "bridge")
        ip("-n", self.sw, "link", "set", "br0", "up")
        self.addr: dict[str, str] = {}
        for i, side in enumerate("ab"):
            ns = self.tag + side
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", self.sw, "link", "add", f"v{side}", "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            ip("-n", self.sw, "link", "set", f"v{side}", "master", "br0")
            ip("-n", self.sw, "link", "set", f"v{side}", "up")
            self.addr[side] = f"{self.subnet}.{i + 2}"
            ip("-n", ns, "addr", "add", f"{self.addr[side]}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def prefix(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.tag + side]

    def cut(self, side: str, down: bool) -> None:
        ip("-n", self.sw, "link", "set", f"v{side}", "down" if down else "up")

    def close(self) -> None:
        for ns in (self.tag + "a", self.tag + "b", self.sw):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    try:
        yield n
    finally:
        n.close()


def test_partition_and_heal(net: Net, tmp_path: Path) -> None:
    fast = ["--fast"]
    a = RunnerProc(tmp_path / "a", 3, extra=[*fast, "--listen", f"{net.addr['a']}:0"],
                   prefix=net.prefix("a"))
    b = RunnerProc(tmp_path / "b", 3, bootstrap=[a.tickets[0]],
                   extra=[*fast, "--listen", f"{net.addr['b']}:0"], prefix=net.prefix("b"))
    procs = [a, b]
    try:
        def nodes() -> list[dict[str, object]]:
            return [s for p in procs for s in p.status()]

        wait_for(lambda: all(s["alive"] == 5 for s in nodes()), within=15)
        net.cut("b", down=True)
        # each side marks the other unresponsive, and keeps working on its own
        wait_for(lambda: all(s["alive"] == 2 for s in nodes()), within=15)
        a.call(cmd="publish", node=1, kind="test", payload="from a")
        b.call(cmd="publish", node=2, kind="test", payload="from b")
        wait_for(lambda: all(s["ops"] == 1 for s in nodes()), within=5)
        net.cut("b", down=False)
        wait_for(lambda: all(s["alive"] == 5 and s["ops"] == 2 for s in nodes()), within=30)
    finally:
        for p in procs:
            p.stop()
