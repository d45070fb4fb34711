"""Stream 1 GiB over one blobmesh stream between two processes, against raw sockets.

    .venv/bin/python benchmarks/bench_transport.py [--size-mb 1024] [--runs 5] [--chunk-kb 1024]

In the same run and on loopback, a server process sends SIZE bytes to this process over:
(a) one blobmesh stream (TLS 1.3, framed, flow-controlled); (b) a raw Python TLS socket with
the same certificates (blocking, ``sendall``/``recv_into``, the best plain ``ssl`` does);
(c) raw TCP.  Prints the median GiB/s of each and the ratios (goal: blobmesh >= 0.8 GiB/s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import subprocess
import sys
import time

from blobmesh.errors import StreamClosedError
from blobmesh.transport import Endpoint, Identity, Stream, Ticket, install_uvloop
from blobmesh.transport.tls import make_context

MiB = 1024 * 1024
GiB = 1024 * MiB
REQUEST = struct.Struct(">QQ")  # size, chunk


# --- server side (child process) -------------------------------------------------------------


async def serve_blobmesh() -> None:
    async def source(stream: Stream) -> None:
        size, chunk = REQUEST.unpack(await stream.recv())
        block = bytes(chunk)
        for _ in range(size // chunk):
            await stream.send(block)
        await stream.close()

    async with await Endpoint.start(Identity.generate()) as ep:
        ep.set_handler("bench", source)
        print(ep.ticket, flush=True)
        await asyncio.Event().wait()  # until terminated


def serve_raw(tls: bool) -> None:
    ctx = make_context(Identity.generate(), server=True) if tls else None
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        print(lsock.getsockname()[1], flush=True)
        while True:
            raw, _ = lsock.accept()
            sock: socket.socket = ctx.wrap_socket(raw, server_side=True) if ctx else raw
            with sock:
                size, chunk = REQUEST.unpack(_recv_exactly(sock, REQUEST.size))
                block = bytes(chunk)
                for _ in range(size // chunk):
                    sock.sendall(block)
                _recv_exactly(sock, 1)  # the client's "done": all was read


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return data


# --- client side -----------------------------------------------------------------------------


def spawn(role: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", role],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def pull_raw(port: int, tls: bool, size: int, chunk: int) -> float:
    ctx = make_context(Identity.generate(), server=False) if tls else None
    raw = socket.create_connection(("127.0.0.1", port))
    sock: socket.socket = ctx.wrap_socket(raw) if ctx else raw
    buf = memoryview(bytearray(4 * MiB))
    with sock:
        started = time.perf_counter()
        sock.sendall(REQUEST.pack(size, chunk))
        got = 0
        while got < size:
            n = sock.recv_into(buf)
            if not n:
                raise ConnectionError("closed early")
            got += n
        elapsed = time.perf_counter() - started
        sock.sendall(b"k")
    return elapsed


async def pull_blobmesh(ep: Endpoint, ticket: Ticket, size: int, chunk: int) -> float:
    node = ep.add_ticket(ticket)
    started = time.perf_counter()
    stream = await ep.open_stream(node, "bench")
    await stream.send(REQUEST.pack(size, chunk))
    got = 0
    while True:
        try:
            got += len(await stream.recv())
        except StreamClosedError:
            break
    elapsed = time.perf_counter() - started
    assert got == size, (got, size)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--chunk-kb", type=int, default=1024, help="message size")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--serve", choices=["blobmesh", "tls", "tcp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.no_uvloop:
        install_uvloop()
    if args.serve == "blobmesh":
        asyncio.run(serve_blobmesh())
        return
    if args.serve:
        serve_raw(args.serve == "tls")
        return

    size, chunk = args.size_mb * MiB, args.chunk_kb * 1024
    size -= size % chunk
    kinds = ("blobmesh", "tls", "tcp")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}  # sender's
    rcpu: dict[str, list[float]] = {k: [] for k in kinds}  # receiver's (this process)
    servers = {k: spawn(k) for k in kinds}
    try:
        with asyncio.Runner() as runner:
            ticket = Ticket.parse(servers["blobmesh"][1])
            ep = runner.run(Endpoint.start(Identity.generate()))
            runner.run(pull_blobmesh(ep, ticket, chunk, chunk))  # connect and warm up
            # interleaved, so load from elsewhere on the machine hits all three alike
            for _ in range(args.runs):
                for k in kinds:
                    before = cpu_seconds(servers[k][0].pid)
                    mine = cpu_seconds(os.getpid())
                    if k == "blobmesh":
                        elapsed = runner.run(pull_blobmesh(ep, ticket, size, chunk))
                    else:
                        elapsed = pull_raw(int(servers[k][1]), k == "tls", size, chunk)
                    times[k].append(elapsed)
                    cpu[k].append(cpu_seconds(servers[k][0].pid) - before)
                    rcpu[k].append(cpu_seconds(os.getpid()) - mine)
            runner.run(ep.aclose())
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
    rate = {k: size / GiB / statistics.median(v) for k, v in times.items()}
    print(f"{size / MiB:.0f} MiB in {chunk // 1024} KiB messages, median of {args.runs} runs, "
          f"{'uvloop' if not args.no_uvloop else 'asyncio'} event loop")
    for k, label in (("blobmesh", "blobmesh stream (TLS 1.3)"),
                     ("tls", "raw TLS socket, blocking"), ("tcp", "raw TCP socket, blocking")):
        runs = " ".join(f"{size / GiB / t:.2f}" for t in times[k])
        send_cpu, recv_cpu = (statistics.median(c[k]) / (size / GiB) for c in (cpu, rcpu))
        print(f"  {label:26s} {rate[k]:5.2f} GiB/s   CPU s/GiB: sender {send_cpu:4.2f} "
              f"receiver {recv_cpu:4.2f}   (runs: {runs})")
    print(f"  blobmesh / raw TLS = {rate['blobmesh'] / rate['tls']:.2f}   "
          f"blobmesh / raw TCP = {rate['blobmesh'] / rate['tcp']:.2f}   "
          f"goal >= 0.8 GiB/s: {'met' if rate['blobmesh'] >= 0.8 else 'NOT met'}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

if __name__ == "__main__":
    main()
