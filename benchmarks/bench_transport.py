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
import socket
import ssl
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
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


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
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
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
    times: dict[str, list[float]] = {"blobmesh": [], "tls": [], "tcp": []}
    servers = {role: spawn(role) for role in times}
    try:

        async def run_blobmesh() -> None:
            ticket = Ticket.parse(servers["blobmesh"][1])
            async with await Endpoint.start(Identity.generate()) as ep:
                await pull_blobmesh(ep, ticket, chunk, chunk)  # connect and warm up
                for _ in range(args.runs):
                    times["blobmesh"].append(await pull_blobmesh(ep, ticket, size, chunk))

        asyncio.run(run_blobmesh())
        for role in ("tls", "tcp"):
            for _ in range(args.runs):
                times[role].append(pull_raw(int(servers[role][1]), role == "tls", size, chunk))
    finally:
        for proc, _ in servers.values():
            proc.communicate("")
    rate = {k: size / GiB / statistics.median(v) for k, v in times.items()}
    print(f"{size / MiB:.0f} MiB in {chunk // 1024} KiB messages, median of {args.runs} runs, "
          f"{'uvloop' if not args.no_uvloop else 'asyncio'} event loop")
    for k, label in (("blobmesh", "blobmesh stream (TLS 1.3)"),
                     ("tls", "raw TLS socket, blocking"), ("tcp", "raw TCP socket, blocking")):
        runs = " ".join(f"{size / GiB / t:.2f}" for t in times[k])
        print(f"  {label:28s} {rate[k]:5.2f} GiB/s   (runs: {runs})")
    print(f"  blobmesh / raw TLS = {rate['blobmesh'] / rate['tls']:.2f}   "
          f"blobmesh / raw TCP = {rate['blobmesh'] / rate['tcp']:.2f}   "
          f"goal >= 0.8 GiB/s: {'met' if rate['blobmesh'] >= 0.8 else 'NOT met'}")


if __name__ == "__main__":
    main()
