"""A lab of Linux network namespaces: hosts on one rate-limited switch (for ``bench_swarm``).

Every host is a namespace ``<prefix>-hI`` with a veth ``eth0`` (10.77.0.(10+I)/24) whose
peer ``pI`` sits on bridge ``br0`` in a dedicated switch namespace ``<prefix>-sw``, so
nothing touches the machine's own network.  Both ends of every link get a ``tbf`` egress
limit: the host side limits the host's upload, the switch side its download.

Also a tiny raw-TCP throughput probe (run as ``python netlab.py sink|source ...`` inside
namespaces) used to measure what a link really carries.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

SUBNET = "10.77.0"
HOST_BASE = 10  # host I is 10.77.0.(10+I)
PROBE_PORT = 5201
MiB = 1024 * 1024


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc


def list_namespaces() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@dataclass
class NetLab:
    """``with NetLab(hosts=8, rate_mbit=100) as lab: lab.exec(0, [...])``"""

    hosts: int
    rate_mbit: float = 100.0
    prefix: str = "bmbench"
    burst: str = "256kb"  # veth sends 64 KiB GSO packets: less burst loses throughput
    latency: str = "100ms"
    slow_mbit: dict[int, float] = field(default_factory=dict)  # host -> its own link rate
    created: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def ns(self, i: int) -> str:
        return f"{self.prefix}-h{i}"

    def ip(self, i: int) -> str:
        return f"{SUBNET}.{HOST_BASE + i}"

    def cleanup(self) -> None:
        """Delete every namespace of this prefix (ours, or left over by a crashed run).

        Deleting a namespace destroys the veth ends inside it, and with them their peers.
        """
        for name in list_namespaces():
            if name == self.switch or name.startswith(f"{self.prefix}-h"):
                for pid in _run("ip", "netns", "pids", name, check=False).stdout.split():
                    # processes left in a namespace of ours by a crashed run of ours
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                _run("ip", "netns", "del", name, check=False)
        self.created.clear()

    def _tbf(self, ns: str, dev: str, mbit: float) -> None:
        _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
             "rate", f"{mbit:g}mbit", "burst", self.burst, "latency", self.latency)

    def build(self) -> None:
        self.cleanup()
        sw = self.switch
        _run("ip", "netns", "add", sw)
        self.created.append(sw)
        _run("ip", "-n", sw, "link", "set", "lo", "up")
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        for i in range(self.hosts):
            ns = self.ns(i)
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", sw, "link", "add", f"p{i}", "type", "veth",
                 "peer", "name", "eth0", "netns", ns)
            _run("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0")
            _run("ip", "-n", sw, "link", "set", f"p{i}", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            mbit = self.slow_mbit.get(i, self.rate_mbit)
            self._tbf(ns, "eth0", mbit)
            self._tbf(sw, f"p{i}", mbit)
        # the bridge learns and forwards at once (no STP listening delay on new ports)
        _run("ip", "-n", sw, "link", "set", "br0", "type", "bridge", "forward_delay", "0",
             check=False)

    def cmd(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``i``'s namespace."""
        return ["ip", "netns", "exec", self.ns(i), *argv]

    def wait_reachable(self, timeout: float = 10.0) -> None:
        """Until host 0 reaches every other host (the bridge may take a moment)."""
        # a refused connection (ECONNREFUSED) proves the host answered
        probe = ("import socket,sys\n"
                 "for a in sys.argv[1:]:\n"
                 "    s=socket.socket(); s.settimeout(0.5); r=s.connect_ex((a,9)); s.close()\n"
                 "    if r not in (0,111): sys.exit(1)\n")
        deadline = time.monotonic() + timeout
        targets = [self.ip(i) for i in range(1, self.hosts)]
        while True:
            proc = subprocess.run(self.cmd(0, [sys.executable, "-c", probe, *targets]),
                                  capture_output=True)
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the lab's hosts cannot reach each other")
            time.sleep(0.2)

    def measure_mbit(self, src: int = 0, dst: int = 1, size_mb: int = 48) -> float:
        """Raw TCP goodput (Mbit/s) from host ``src`` to host ``dst`` through both links."""
        sink = subprocess.Popen(self.cmd(dst, [sys.executable, __file__, "sink",
                                               self.ip(dst)]),
                                stdout=subprocess.PIPE, text=True)
        try:
            assert sink.stdout is not None
            sink.stdout.readline()  # "ready"
            subprocess.run(self.cmd(src, [sys.executable, __file__, "source", self.ip(dst),
                                          str(size_mb)]), capture_output=True, check=True)
            return float(sink.stdout.readline())
        finally:
            sink.kill()
            sink.wait()

    def __enter__(self) -> NetLab:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# --- the throughput probe (runs inside namespaces) -------------------------------------------


def _sink(host: str) -> None:
    """Receive until EOF; print the goodput after the first MiBs (tbf bucket, slow start)."""
    with socket.create_server((host, PROBE_PORT)) as srv:
        print("ready", flush=True)
        conn, _ = srv.accept()
        with conn:
            buf = bytearray(1 << 20)
            got, mark, t0 = 0, 4 * MiB, 0.0
            while n := conn.recv_into(buf):
                got += n
                if t0 == 0.0 and got >= mark:
                    t0, mark = time.perf_counter(), got
            elapsed = time.perf_counter() - t0
    print(f"{(got - mark) * 8 / elapsed / 1e6:.3f}", flush=True)


def _source(host: str, size_mb: int) -> None:
    block = bytes(MiB)
    with socket.create_connection((host, PROBE_PORT)) as conn:
        for _ in range(size_mb):
            conn.sendall(block)


if __name__ == "__main__":
    if sys.argv[1] == "sink":
        _sink(sys.argv[2])
    elif sys.argv[1] == "source":
        _source(sys.argv[2], int(sys.argv[3]))
