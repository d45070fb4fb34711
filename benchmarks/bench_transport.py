"""Stream 1 GiB over one blobmesh stream between two processes, against raw sockets.

    .venv/bin/python benchmarks/bench_transport.py [--size-mb 1024] [--runs 3] [--chunk-kb 1024]

In the same run and on loopback, SIZE bytes go over: (a) one blobmesh stream between two
processes (TLS 1.3, framed, flow-controlled); (b) a raw Python TLS socket with the same
certificates between two processes (blocking ``sendall``/``recv_into``, the best plain
``ssl`` does); (c) the same between two threads of this process (the limit the issue
names); (d) raw TCP between two processes.  Prints the median GiB/s of each, the ratio of
blobmesh to each limit, and CPU seconds (user + system) per GiB at each end (goal: blobmesh
about 1x raw TLS, at about its CPU per GiB).
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
import threading
import time

from blobmesh.errors import StreamClosedError
from blobmesh.transport import Endpoint, Identity, Stream, Ticket, install_uvloop, tune_malloc
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


def spawn(role: str, *flags: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", role, *flags],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def _discard(sock: socket.socket, size: int) -> None:
    """Receive ``size`` bytes into one reused buffer (the raw baselines' receive loop)."""
    buf = memoryview(bytearray(4 * MiB))
    got = 0
    while got < size:
        n = sock.recv_into(buf)
        if not n:
            raise ConnectionError("closed early")
        got += n


def pull_raw(port: int, tls: bool, size: int, chunk: int) -> float:
    ctx = make_context(Identity.generate(), server=False) if tls else None
    raw = socket.create_connection(("127.0.0.1", port))
    sock: socket.socket = ctx.wrap_socket(raw) if ctx else raw
    with sock:
        started = time.perf_counter()
        sock.sendall(REQUEST.pack(size, chunk))
        _discard(sock, size)
        elapsed = time.perf_counter() - started
        sock.sendall(b"k")
    return elapsed


def tls_two_threads(size: int, chunk: int) -> tuple[float, float]:
    """Raw TLS from a thread to this thread: (elapsed, CPU seconds of both)."""
    server_ctx = make_context(Identity.generate(), server=True)
    client_ctx = make_context(Identity.generate(), server=False)
    with socket.create_server(("127.0.0.1", 0)) as lsock:

        def serve() -> None:
            raw, _ = lsock.accept()
            with server_ctx.wrap_socket(raw, server_side=True) as sock:
                block = bytes(chunk)
                for _ in range(size // chunk):
                    sock.sendall(block)
                _recv_exactly(sock, 1)

        sender = threading.Thread(target=serve)
        sender.start()
        with client_ctx.wrap_socket(socket.create_connection(lsock.getsockname())) as sock:
            cpu = time.process_time()
            started = time.perf_counter()
            _discard(sock, size)
            elapsed = time.perf_counter() - started
            sock.sendall(b"k")
            sender.join()
            return elapsed, time.process_time() - cpu


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
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--no-tune-malloc", action="store_true",
                        help="leave glibc malloc as is (see transport.tune_malloc)")
    parser.add_argument("--serve", choices=["blobmesh", "tls", "tcp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.no_uvloop:
        install_uvloop()
    if not args.no_tune_malloc:
        tune_malloc()
    if args.serve == "blobmesh":
        asyncio.run(serve_blobmesh())
        return
    if args.serve:
        serve_raw(args.serve == "tls")
        return

    size, chunk = args.size_mb * MiB, args.chunk_kb * 1024
    size -= size % chunk
    kinds = ("blobmesh", "tls", "tls-threads", "tcp")
    procs = ("blobmesh", "tls", "tcp")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}  # sender's (both ends: threads)
    rcpu: dict[str, list[float]] = {k: [] for k in kinds}  # receiver's (this process)
    flags = [f for f, off in (("--no-uvloop", args.no_uvloop),
                              ("--no-tune-malloc", args.no_tune_malloc)) if off]
    servers = {k: spawn(k, *flags) for k in procs}
    try:
        with asyncio.Runner() as runner:
            ticket = Ticket.parse(servers["blobmesh"][1])
            ep = runner.run(Endpoint.start(Identity.generate()))
            runner.run(pull_blobmesh(ep, ticket, chunk, chunk))  # connect and warm up
            # interleaved, so load from elsewhere on the machine hits all of them alike
            for _ in range(args.runs):
                for k in kinds:
                    if k == "tls-threads":
                        elapsed, both = tls_two_threads(size, chunk)
                        times[k].append(elapsed)
                        cpu[k].append(both)
                        rcpu[k].append(0.0)
                        continue
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
    gib = size / GiB
    rate = {k: gib / statistics.median(v) for k, v in times.items()}
    print(f"{size / MiB:.0f} MiB in {chunk // 1024} KiB messages, median of {args.runs} runs, "
          f"{'uvloop' if not args.no_uvloop else 'asyncio'} event loop, "
          f"{'tuned' if not args.no_tune_malloc else 'default'} malloc, load "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for k, label in (("blobmesh", "blobmesh stream (TLS 1.3)"),
                     ("tls", "raw TLS, two processes"), ("tls-threads", "raw TLS, two threads"),
                     ("tcp", "raw TCP, two processes")):
        runs = " ".join(f"{gib / t:.2f}" for t in times[k])
        send_cpu, recv_cpu = (statistics.median(c[k]) / gib for c in (cpu, rcpu))
        where = (f"both ends {send_cpu:4.2f}" if k == "tls-threads" else
                 f"sender {send_cpu:4.2f} receiver {recv_cpu:4.2f}")
        print(f"  {label:26s} {rate[k]:5.2f} GiB/s   CPU s/GiB: {where}   (runs: {runs})")
    print(f"  blobmesh / raw TLS (processes) = {rate['blobmesh'] / rate['tls']:.2f}   "
          f"blobmesh / raw TLS (threads) = {rate['blobmesh'] / rate['tls-threads']:.2f}   "
          f"blobmesh / raw TCP = {rate['blobmesh'] / rate['tcp']:.2f}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

if __name__ == "__main__":
    main()
