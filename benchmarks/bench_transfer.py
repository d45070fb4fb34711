"""Transfer throughput over TLS between two processes, against the machine's own limits.

    .venv/bin/python benchmarks/bench_transfer.py [--size-mib 1024] [--small 1000] [--runs 3]

In one run it measures: (a) a raw Python TLS 1.3 socket copy of the same number of bytes
between two processes (blocking sockets, the node certificates of the transport), (b) writing
that many bytes to a file in ``--dir`` with fsync, and (c) ``blobmesh serve`` in one process
while a client process pulls the blob into a fresh store in ``--client-dir`` (TLS, every piece
verified, durable, stored; by default on tmpfs, so the disk is not the limit).  Then the
client pulls ``--small`` blobs of 16 KiB over one connection: batched (``pull_many``, one
stream) and, for comparison, as 64 channels in flight.
Each figure is the median of ``--runs``; peak RSS is each process's VmHWM.  CPU seconds per
GiB (user + system, both ends, connection setup excluded) say what the pull costs whatever the
machine's load, against the same for the raw TLS copy.
Goal (issue 9): (c) >= 0.5 x (a); >= 2,000 small blobs/s; RSS < 200 MiB per side.
``--profile DIR [--profiler py-spy|perf]`` records both ends of each big pull into
``DIR/pull-<run>-server`` and ``-client`` (py-spy: collapsed Python stacks of the thread
holding the GIL; perf: on-CPU samples, native and kernel); the profiler's own cost is then in
that run's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB
SMALL = 16 * 1024


def vm_hwm_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


# --- (a) raw TLS copy ------------------------------------------------------------------------


def _tls_contexts(home: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    from blobmesh.transport import Identity
    from blobmesh.transport.tls import make_context

    server = Identity.load_or_create(home / "tls-server")
    client = Identity.load_or_create(home / "tls-client")
    return make_context(server, server=True), make_context(client, server=False)


def tls_sender(home: str, port: str, size: str) -> None:
    """Child: accept one TLS connection and send ``size`` bytes of it."""
    ctx, _ = _tls_contexts(Path(home))
    with socket.create_server(("127.0.0.1", int(port))) as srv:
        print("ready", flush=True)
        conn, _ = srv.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            buf = os.urandom(MiB)
            cpu = time.process_time()
            left = int(size)
            while left:
                left -= tls.send(buf[: min(left, len(buf))])
            print(time.process_time() - cpu, flush=True)
            tls.recv(1)


def raw_tls_copy(work: Path, size: int) -> tuple[float, float]:
    """Bytes per second, and the CPU seconds both ends spent (handshakes excluded)."""
    _, ctx = _tls_contexts(work)
    ctx.check_hostname = False
    port = _free_port()
    child = subprocess.Popen([sys.executable, __file__, "_tls_sender", str(work), str(port),
                              str(size)], stdout=subprocess.PIPE)
    assert child.stdout is not None
    child.stdout.readline()
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="blobmesh") as tls:
        t, cpu = time.perf_counter(), time.process_time()
        got = 0
        buf = bytearray(MiB)
        while got < size:
            n = tls.recv_into(buf)
            if not n:
                break
            got += n
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        sender_cpu = float(child.stdout.readline())
        tls.send(b"x")
    child.wait(30)
    assert got == size
    return size / seconds, cpu + sender_cpu


# --- (b) fsynced write -----------------------------------------------------------------------


def fsync_write(work: Path, size: int) -> float:
    path = work / "fsync.bin"
    buf = os.urandom(4 * MiB)
    t = time.perf_counter()
    with open(path, "wb") as f:
        left = size
        while left:
            left -= f.write(buf[: min(left, len(buf))])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t
    path.unlink()
    return size / seconds


# --- (c) blobmesh ----------------------------------------------------------------------------


async def _pull(home: str, ticket: str, ids: list[str], parallel: int, batched: bool
                ) -> dict[str, float]:
    from blobmesh.hashing import BlobId
    from blobmesh.store import Store
    from blobmesh.transfer import TransferManager, Voucher
    from blobmesh.transport import Endpoint, Identity, Ticket

    with Store(home) as store:
        ep = await Endpoint.start(Identity.load_or_create(home))
        async with ep, TransferManager(ep, store) as mgr:
            peer = ep.add_ticket(Ticket.parse(ticket))
            voucher = Voucher("blobmesh/open")
            sem = asyncio.Semaphore(parallel)

            async def one(text: str) -> None:
                async with sem:
                    chid = await mgr.open_pull(peer, voucher, BlobId.parse(text))
                    await mgr.wait(chid)

            t, cpu = time.perf_counter(), time.process_time()
            if batched:
                await mgr.pull_many(peer, voucher, [BlobId.parse(text) for text in ids])
            else:
                async with asyncio.TaskGroup() as tg:
                    for text in ids:
                        tg.create_task(one(text))
            seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"seconds": seconds, "cpu_s": cpu, "maxrss_kib": vm_hwm_kib()}


def pull_client(home: str, ticket: str, ids_file: str, parallel: str, mode: str) -> None:
    """Child: pull the blobs listed in ``ids_file`` into ``home`` (``mode``: ``batch`` for
    ``pull_many``, ``channels`` for ``parallel`` channels at a time); print seconds and RSS."""
    from blobmesh.transport import install_uvloop, tune_malloc

    install_uvloop()
    tune_malloc()
    ids = Path(ids_file).read_text().split()
    print(json.dumps(asyncio.run(_pull(home, ticket, ids, int(parallel), mode == "batch"))))


def start_profiler(tool: str, pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Record ``pid`` until SIGINT: ``py-spy`` (collapsed Python stacks of the GIL holder,
    into ``out``.txt) or ``perf`` (on-CPU samples of every thread, native and kernel, into
    ``out``.perf)."""
    if tool == "py-spy":
        argv = [str(Path(sys.executable).with_name("py-spy")), "record", "--gil", "--threads",
                "--format", "raw", "--rate", "200", "-o", f"{out}.txt", "--pid", str(pid)]
    else:
        argv = ["perf", "record", "-F", "499", "-g", "-o", f"{out}.perf", "-p", str(pid)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profilers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        p.wait(60)


def run_client(work: Path, client_dir: Path, ticket: str, ids: list[str], parallel: int,
               mode: str = "channels", profile: tuple[str, Path, int] | None = None
               ) -> dict[str, float]:
    """Pull ``ids`` in a child; with ``profile`` (profiler, file stem, server pid) both ends
    are recorded while it runs."""
    home = client_dir / f"{work.name}-client"
    shutil.rmtree(home, ignore_errors=True)
    ids_file = work / "ids.txt"
    ids_file.write_text("\n".join(ids))
    child = subprocess.Popen([sys.executable, __file__, "_pull", str(home), ticket,
                              str(ids_file), str(parallel), mode], stdout=subprocess.PIPE)
    profilers = [] if profile is None else [
        start_profiler(profile[0], pid, profile[1].with_name(f"{profile[1].name}-{end}"))
        for pid, end in ((profile[2], "server"), (child.pid, "client"))]
    try:
        stdout, _ = child.communicate(timeout=600)
    finally:
        stop_profilers(profilers)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, child.args)
    result: dict[str, float] = json.loads(stdout)
    shutil.rmtree(home, ignore_errors=True)
    return result


class Server:
    def __init__(self, home: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blobmesh.cli.main", "--home", str(home), "serve",
             "--listen", f"127.0.0.1:{_free_port()}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        self.ticket = self.proc.stdout.readline().decode().strip()

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) the server has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        rss = vm_hwm_kib(self.proc.pid)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)
        return rss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def prepare(home: Path, size: int, small: int) -> tuple[str, list[str]]:
    from blobmesh.store import LeaseId, Store

    lease = LeaseId.named("bench")
    with Store(home) as store:
        chunk = os.urandom(16 * MiB)
        big = store.add_stream(chunk[: min(len(chunk), size - off)]
                               for off in range(0, size, len(chunk)))
        store.pin(big.blob_id, "bench/big")
        ids = []
        for i in range(small):
            info = store.add_bytes(os.urandom(SMALL), lease)
            store.pin(info.blob_id, f"bench/small/{i}")
            ids.append(str(info.blob_id))
    return str(big.blob_id), ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--small", type=int, default=1000, help="small blobs (0: none)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--client-dir", type=Path, default=Path("/dev/shm"),
                    help="where the client's store home goes (default: tmpfs)")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="record both ends of each big pull, into DIR")
    ap.add_argument("--profiler", choices=("py-spy", "perf"), default="py-spy",
                    help="--profile: py-spy (Python stacks of the GIL holder) or perf "
                         "(on-CPU samples, native and kernel)")
    args = ap.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="bench-transfer-", dir=args.dir))
    try:
        big, small_ids = prepare(work / "server", size, args.small)
        tls, disk, pulls, smalls, rss_client, rss_server = [], [], [], [], [], []
        small_channels: list[float] = []
        tls_cpu, pull_cpu = [], []  # CPU seconds of both ends per GiB
        for run in range(args.runs):
            rate, cpu = raw_tls_copy(work, size)
            tls.append(rate)
            tls_cpu.append(cpu * GiB / size)
            disk.append(fsync_write(work, size))
            srv = Server(work / "server")
            try:
                server_cpu = srv.cpu_s()
                prof = (args.profiler, args.profile / f"pull-{run + 1}", srv.proc.pid) \
                    if args.profile else None
                r = run_client(work, args.client_dir, srv.ticket, [big], 1, profile=prof)
                pulls.append(size / r["seconds"])
                pull_cpu.append((r["cpu_s"] + srv.cpu_s() - server_cpu) * GiB / size)
                rss_client.append(r["maxrss_kib"])
                if not args.small:
                    continue
                s = run_client(work, args.client_dir, srv.ticket, small_ids, 64, "batch")
                smalls.append(args.small / s["seconds"])
                rss_client.append(s["maxrss_kib"])
                s = run_client(work, args.client_dir, srv.ticket, small_ids, 64)
                small_channels.append(args.small / s["seconds"])
            finally:
                rss_server.append(srv.stop())
        a, b, c = (statistics.median(x) for x in (tls, disk, pulls))
        report = {
            "size_mib": args.size_mib, "runs": args.runs,
            "raw_tls_gib_s": round(a / GiB, 3), "fsync_write_gib_s": round(b / GiB, 3),
            "pull_gib_s": round(c / GiB, 3), "pull_vs_raw_tls": round(c / a, 3),
            "pull_vs_min_a_b": round(c / min(a, b), 3),
            "raw_tls_cpu_s_per_gib": round(statistics.median(tls_cpu), 3),
            "pull_cpu_s_per_gib": round(statistics.median(pull_cpu), 3),
            "small_blobs_per_s": round(statistics.median(smalls)) if smalls else None,
            "small_blobs_per_s_channels":
                round(statistics.median(small_channels)) if small_channels else None,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "peak_rss_mib": {"client": round(max(rss_client) / 1024, 1),
                             "server": round(max(rss_server) / 1024, 1)},
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_tls_sender":
        tls_sender(*sys.argv[2:5])
    elif len(sys.argv) > 1 and sys.argv[1] == "_pull":
        pull_client(*sys.argv[2:7])
    else:
        main()
