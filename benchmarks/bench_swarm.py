"""One source, N targets, 100 Mbit/s links: blobmesh's swarm against the Kumar–Ross bound,
libtorrent and a plain HTTP fan-out, in one lab of network namespaces.

    sudo .venv/bin/python benchmarks/bench_swarm.py [--quick] [--runs 3]
        [--size-mb S --targets N] [--rate-mbit 100] [--slow-mbit 20]
        [--only blobmesh,libtorrent,http]
        [--lt-tuning super|lan|hps] [--variant NAME=DIR ...]
        [--hostile black-hole|non-reader ...]
    .venv/bin/python benchmarks/bench_swarm.py --loopback [--runs 3] [--profile DIR]
    (either, with ``--profile DIR [--profiler py-spy|perf]``: every blobmesh node profiled)

Builds hosts as network namespaces on one switch namespace (``netlab.py``), each link limited
to ``--rate-mbit`` with ``tbf`` on both ends; measures the real per-link TCP goodput R and uses
it for every upload and download rate in the lower bound
max(F/u_s, F/d_min, N·F/(u_s + Σu_i)) (= F/R when all links are equal; ``--slow-mbit``
gives every other target slower links, measured too).  Default scenarios:
256 MiB to 7 targets and 64 MiB to 15 targets (``--quick``: 32 MiB to 3).  Each system moves
the same file from host 0 to hosts 1..N; the time runs until every target holds a verified
copy.  Goal: blobmesh <= 1.15x the bound, and faster than libtorrent.

Per blobmesh run it also prints when the first target reported progress, the CPU time the
nodes used, and each node's upload in copies of F (source first: ideally 1.00).  The summary
gives every system's CPU seconds per GiB delivered (user + system of every node process, all
threads, from the start until the last target completes, over targets x F; for libtorrent its
worker processes: the session's threads plus a 50 Hz status poll) and blobmesh's ratio to
libtorrent's (goal, issue 9: <= 1 at 256 MiB to 7).
``--variant NAME=DIR`` adds a system ``blobmesh-NAME`` whose nodes import blobmesh from DIR
(a patched copy of ``src/``), interleaved with the others in the same lab; each round starts
with the next system (``round_order``), so none is always first.

``--hostile MODE`` adds a system ``blobmesh+MODE``: the same run with one more space member
(``hostile_node.py``) whose swarm is a ``black-hole`` (claims every piece, answers nothing) or
a ``non-reader`` (asks everyone for everything, reads nothing); goal: <= 1.2x the clean run.
Every blobmesh run also counts the swarm connections reset for protocol errors (the end-game
"unsolicited piece" resets of old); with ``--runs`` >= 3 the tail is judged: worst <= 1.1x
the median.

``--loopback`` runs blobmesh (and its variants) on 127.0.0.1 instead: no namespaces, no tbf,
node homes on tmpfs (``--home-dir``), so the data plane is the limit, not the links.  Default
scenarios: 1 GiB to 1 target and 512 MiB to 4 targets.  Each run first measures raw
single-stream TLS 1.3 between two processes over the same number of bytes
(``bench_transfer.raw_tls_copy``), then every system, interleaved; it prints each target's
throughput against that raw TLS rate and the CPU seconds per GiB delivered (user + system of
every node process, all threads, over targets x F), medians of ``--runs``.
Goals (issue 9): 1 -> 1 >= 0.4x raw TLS; 512 MiB -> 4 <= 3 CPU-s per GiB delivered.
``--profile DIR`` records every node during each run into DIR (``--profiler py-spy``:
collapsed Python stacks of the GIL holder; ``perf``: on-CPU samples, native and kernel); the
profiler's own cost is then in the CPU figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blobmesh.demo import make_payload
from blobmesh.distribution.model import DistributionStatus, TargetState
from blobmesh.hashing import BlobId
from blobmesh.hashing.tree import choose_piece_size
from blobmesh.node.client import NodeClient
from blobmesh.node.fleet import Fleet, FleetNode
from blobmesh.sim.bounds import kumar_ross
from blobmesh.store import LeaseId, Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transfer import raw_tls_copy
from netlab import NetLab

MiB = 1024 * 1024
GiB = 1024 * MiB
SYSTEMS = ("blobmesh", "libtorrent", "http")
LT_PORT = 6881
HTTP_PORT = 8080
_UPLOADED = re.compile(r"^blobmesh_swarm_uploaded_bytes_total (\S+)$", re.M)
_RESETS = re.compile(r"^blobmesh_swarm_protocol_errors_total (\S+)$", re.M)
_EXPIRED = re.compile(r"^blobmesh_swarm_requests_expired_total (\S+)$", re.M)
_BANNED = re.compile(r"^blobmesh_swarm_peers_banned_total\{.*\} (\S+)$", re.M)
HOSTILE_NODE = Path(__file__).with_name("hostile_node.py")


@dataclass
class Outcome:
    """One run of one system."""

    seconds: float
    ok: bool
    note: str = ""
    uploads: list[int] = field(default_factory=list)  # bytes per host, source first
    cpu: float = 0.0  # CPU seconds the nodes used during the transfer
    first_byte: float = 0.0  # seconds until a target first reported progress (start-up)
    finish: list[float] = field(default_factory=list)  # per target, seconds from start
    code: str = ""  # fingerprint of the swarm code a blobmesh run used
    resets: int = 0  # swarm connections reset for protocol errors, over all nodes
    expired: int = 0  # piece requests re-issued after their deadline, over all nodes
    banned: int = 0  # peers banned, over all nodes
    node_cpu: list[float] = field(default_factory=list)  # per node, source first


def file_digest(path: Path) -> str:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


async def copies_match(paths: Sequence[Path], digest: str) -> bool:
    found = await asyncio.gather(*(asyncio.to_thread(file_digest, p) for p in paths))
    return all(d == digest for d in found)


# --- blobmesh ----------------------------------------------------------------------------------


class BenchFleet(Fleet):
    """A :class:`Fleet` whose node ``i`` runs inside lab host ``i``, listening on its address
    (without a lab: on 127.0.0.1, in this machine's network)."""

    def __init__(self, root: Path, lab: NetLab | None, code: Path | None = None) -> None:
        super().__init__(root)
        self.lab = lab
        self.hostile: dict[int, str] = {}  # node index -> mode (see hostile_node.py)
        self.env = dict(os.environ)
        if code is not None:  # nodes import blobmesh from there (a patched copy of src/)
            self.env["PYTHONPATH"] = os.pathsep.join(
                [str(code), *filter(None, [self.env.get("PYTHONPATH")])])

    def add_host(self) -> FleetNode:
        self.listen_host = self.lab.ip(len(self.nodes)) if self.lab else "127.0.0.1"
        return self.add()

    def _popen(self, node: FleetNode) -> None:
        cmd = [sys.executable, "-m", "blobmesh.cli.main", "--home", str(node.home),
               "node", "run", *node.args]
        if node.index in self.hostile:
            cmd = [sys.executable, str(HOSTILE_NODE), self.hostile[node.index],
                   "--home", str(node.home), *node.args]
        seed = next((n for n in self.nodes if n.running and n is not node and n.ticket), None)
        if seed is not None:
            cmd += ["--bootstrap", seed.ticket]
        if self.lab is not None:
            cmd = self.lab.cmd(node.index, cmd)
        log_path = self.root / f"node{node.index}.{len(node.logs)}.log"
        node.logs.append(log_path)
        with open(log_path, "wb") as log:
            node.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                         stdin=subprocess.DEVNULL, env=self.env)


async def node_metrics(fleet: Fleet) -> list[str]:
    out = []
    for node in fleet.nodes:
        async with NodeClient(node.home) as c:
            out.append(await c.metrics())
    return out


def metric_sum(texts: Sequence[str], pattern: re.Pattern[str]) -> int:
    return sum(int(float(m)) for text in texts for m in pattern.findall(text))


def verify_blob(home: Path, blob: BlobId) -> bool:
    with Store(home) as store:
        if not store.has(blob):
            return False
        with store.get_reader(blob, LeaseId.new("bench-verify"), verify=True) as r:
            while r.read(4 * MiB):
                pass
    return True


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time (all threads) of process ``pid`` so far (0 if not running)."""
    ticks = 0
    if pid is not None:
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def node_cpu_seconds(fleet: Fleet) -> list[float]:
    """:func:`cpu_seconds` of each node process."""
    return [cpu_seconds(node.proc.pid if node.proc is not None else None)
            for node in fleet.nodes]


def start_profilers(fleet: Fleet, out: Path, tool: str) -> list[subprocess.Popen[bytes]]:
    """A profiler on every node until :func:`stop_profilers`: ``py-spy`` (Python stacks of
    the thread holding the GIL, collapsed, into ``out``-node<i>.txt) or ``perf`` (on-CPU
    samples with call graphs of every thread, native and kernel, into ``out``-node<i>.perf)."""
    py_spy = Path(sys.executable).with_name("py-spy")
    procs = []
    for node in fleet.nodes:
        if node.proc is None:
            continue
        pid = str(node.proc.pid)
        if tool == "py-spy":  # the GIL holder: what the Python code costs
            argv = [str(py_spy), "record", "--gil", "--threads", "--format", "raw",
                    "--rate", "200", "-o", f"{out}-node{node.index}.txt", "--pid", pid]
        else:
            argv = ["perf", "record", "-F", "499", "-g", "-o",
                    f"{out}-node{node.index}.perf", "-p", pid]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # attached before the clock starts
    return procs


def stop_profilers(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def keep_logs(fleet: Fleet) -> Path:
    """Copy the node logs of a failed run out of the work dir (which is deleted)."""
    dest = Path(tempfile.mkdtemp(prefix="bench-swarm-failed-"))
    for node in fleet.nodes:
        for log in node.logs:
            with contextlib.suppress(OSError):
                shutil.copy(log, dest / log.name)
    return dest


async def run_blobmesh(lab: NetLab | None, targets: int, payload: Path, work: Path,
                       timeout: float, code: Path | None = None, hostile: str = "",
                       profile: Path | None = None, profiler: str = "py-spy") -> Outcome:
    fleet = BenchFleet(work, lab, code)
    for _ in range(targets + 1):
        fleet.add_host()
    if hostile:  # one more member, which is no real target (it never completes)
        fleet.hostile[fleet.add_host().index] = hostile
    real_targets = fleet.nodes[1:targets + 1]
    try:
        await asyncio.to_thread(fleet.start)
        await fleet.wait_converged(60)
        with Store(fleet.nodes[0].home) as store:
            blob = (await asyncio.to_thread(store.add_path, payload)).blob_id
        finish: dict[str, float] = {}
        profilers = await asyncio.to_thread(start_profilers, fleet, profile, profiler) \
            if profile else []
        async with NodeClient(fleet.nodes[0].home) as client:
            cpu0 = node_cpu_seconds(fleet)
            t0 = time.perf_counter()
            status = await client.distribute(str(blob), "all", "normal")

            def update(s: DistributionStatus) -> None:
                nonlocal status
                status = s
                for t in s.targets:
                    if t.bytes_done and not first_byte:
                        first_byte.append(time.perf_counter() - t0)
                    if t.state is TargetState.COMPLETED and str(t.node) not in finish:
                        finish[str(t.node)] = time.perf_counter() - t0
                    elif t.state is TargetState.FAILED:
                        failures[str(t.node)] = t.reason

            async def follow() -> None:
                # Keep following until every real target holds the blob (an event stream
                # may end early, and a hostile member never completes).
                while status.completed < targets:
                    async for s in client.events(str(status.handle)):
                        update(s)
                        if status.completed >= targets:
                            return
                    update(await client.status(str(status.handle)))
                    await asyncio.sleep(0.05)

            failures: dict[str, str] = {}
            first_byte: list[float] = []  # when the first target reported progress
            await asyncio.wait_for(follow(), timeout)
            elapsed = time.perf_counter() - t0
        node_cpu = [b - a for a, b in zip(cpu0, node_cpu_seconds(fleet), strict=True)]
        await asyncio.to_thread(stop_profilers, profilers)
        metrics = await node_metrics(fleet)
        uploads = [metric_sum([m], _UPLOADED) for m in metrics]
        verified = await asyncio.gather(*(asyncio.to_thread(verify_blob, n.home, blob)
                                          for n in real_targets))
        ok = len(finish) == targets and all(verified)
        notes = [] if ok else [f"{len(finish)}/{targets} completed, {sum(verified)} verified"]
        if failures:
            notes.append(f"{len(failures)} target(s) reported failed on the way, e.g. "
                         f"{next(iter(failures.values()))!r}")
        if not ok:
            notes.append(f"node logs kept in {keep_logs(fleet)}")
        return Outcome(elapsed, ok, "; ".join(notes), uploads, cpu=sum(node_cpu),
                       node_cpu=node_cpu,
                       first_byte=first_byte[0] if first_byte else 0.0,
                       finish=sorted(finish.values()), resets=metric_sum(metrics, _RESETS),
                       expired=metric_sum(metrics, _EXPIRED),
                       banned=metric_sum(metrics, _BANNED))
    except BaseException:
        print(f"  (node logs kept in {keep_logs(fleet)})", flush=True)
        raise
    finally:
        await asyncio.to_thread(fleet.stop)


# --- libtorrent --------------------------------------------------------------------------------


def make_torrent(payload: Path, piece_size: int) -> Path:
    import libtorrent as lt

    fs = lt.file_storage()
    with warnings.catch_warnings():  # the file_storage API is deprecated, yet the simplest
        warnings.simplefilter("ignore", DeprecationWarning)
        lt.add_files(fs, str(payload))
        ct = lt.create_torrent(fs, piece_size, flags=lt.create_torrent.v1_only)
    lt.set_piece_hashes(ct, str(payload.parent))
    out = payload.with_suffix(".torrent")
    out.write_bytes(lt.bencode(ct.generate()))
    return out


def lt_worker(torrent: str, save: str, ip: str, peers: list[str], seed: bool,
              tuning: str) -> None:
    """One libtorrent session (runs inside a host namespace), driven over stdin/stdout.

    Prints ``ready`` once listening (a seed: once its data is checked), waits for ``go``,
    connects to ``peers``, prints ``done`` when it holds every piece, and keeps seeding until
    stdin closes.  ``tuning``: ``lan`` (defaults plus the LAN settings below), ``hps``
    (libtorrent's ``high_performance_seed`` preset plus them), ``super`` (``lan`` with a
    super-seeding source, which hands each piece out once).
    """
    import threading

    import libtorrent as lt

    settings: lt.settings_pack = {
        "listen_interfaces": f"{ip}:{LT_PORT}",
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False,
        "enable_natpmp": False,
        # plain TCP, like blobmesh (uTP's delay-based congestion control would back off)
        "enable_outgoing_utp": False, "enable_incoming_utp": False,
        "connections_limit": 200,
        "unchoke_slots_limit": -1,  # a LAN swarm: nobody needs to be choked
        "seed_choking_algorithm": int(lt.seed_choking_algorithm_t.fastest_upload),
        "upload_rate_limit": 0, "download_rate_limit": 0,
        "suggest_mode": 1,  # seeds suggest pieces in their read cache
        "alert_mask": 0,
    }
    if tuning == "hps":
        settings = {**lt.high_performance_seed(), **settings}
    ses = lt.session(settings)
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(torrent)
    atp.save_path = save
    if seed and tuning == "super":
        atp.flags |= lt.torrent_flags.super_seeding
    h = ses.add_torrent(atp)
    while True:
        st = h.status()
        if st.state not in (lt.torrent_status.checking_files,
                            lt.torrent_status.checking_resume_data) and \
                (st.is_seeding or not seed):
            break
        time.sleep(0.05)
    print("ready", flush=True)
    stdin_closed = threading.Event()
    if sys.stdin.readline().strip() != "go":
        return

    def watch_stdin() -> None:
        sys.stdin.read()
        stdin_closed.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    for p in peers:
        h.connect_peer((p, LT_PORT))
    reported = seed
    while not stdin_closed.wait(0.02):
        if not reported and h.status().is_seeding:
            print("done", flush=True)
            reported = True


async def run_libtorrent(lab: NetLab, targets: int, torrent: Path, payload: Path, digest: str,
                         work: Path, timeout: float, tuning: str) -> Outcome:
    procs: list[asyncio.subprocess.Process] = []
    saves = []
    try:
        for i in range(targets + 1):
            save = payload.parent if i == 0 else work / f"lt{i}"
            save.mkdir(parents=True, exist_ok=True)
            saves.append(save)
            # each target dials the seed and every target before it: one connection per pair
            peers = [lab.ip(j) for j in range(i)]
            argv = [sys.executable, __file__, "--lt-worker", str(torrent), str(save),
                    lab.ip(i), ",".join(peers), "--lt-tuning", tuning] + \
                (["--lt-seed"] if i == 0 else [])
            procs.append(await asyncio.create_subprocess_exec(
                *lab.cmd(i, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), 120)
            if line.strip() != b"ready":
                raise RuntimeError(f"a libtorrent worker failed to start: {line!r}")
        # (``ip netns exec`` execs the worker: the pid is the libtorrent process's)
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        t0 = time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
        await asyncio.gather(*(p.stdin.drain() for p in procs if p.stdin is not None))

        async def finished(p: asyncio.subprocess.Process) -> float:
            assert p.stdout is not None
            line = await p.stdout.readline()
            if line.strip() != b"done":
                raise RuntimeError(f"a libtorrent worker ended early: {line!r}")
            return time.perf_counter() - t0

        finish = await asyncio.wait_for(asyncio.gather(*(finished(p) for p in procs[1:])),
                                        timeout)
        elapsed = max(finish)
        node_cpu = [cpu_seconds(p.pid) - c for p, c in zip(procs, cpu0, strict=True)]
        ok = await copies_match([s / payload.name for s in saves[1:]], digest)
        return Outcome(elapsed, ok, "" if ok else "a copy differs", finish=sorted(finish),
                       cpu=sum(node_cpu), node_cpu=node_cpu)
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 10)
            except TimeoutError:
                p.kill()
                await p.wait()


# --- plain HTTP --------------------------------------------------------------------------------


NGINX_CONF = """daemon off;
master_process off;
user root;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen {ip}:{port};
        root {docroot};
    }}
}}
"""


def start_http_server(lab: NetLab, payload: Path, work: Path) -> subprocess.Popen[bytes]:
    """nginx (else Python's http.server) serving ``payload``'s folder from host 0."""
    work.mkdir(parents=True, exist_ok=True)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if Path(nginx).exists():
        conf = work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(root=work, ip=lab.ip(0), port=HTTP_PORT,
                                          docroot=payload.parent))
        argv = [nginx, "-p", str(work), "-e", str(work / "nginx-error.log"), "-c", str(conf)]
    else:
        argv = [sys.executable, "-m", "http.server", "-b", lab.ip(0), "-d",
                str(payload.parent), str(HTTP_PORT)]
    server = subprocess.Popen(lab.cmd(0, argv), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://{lab.ip(0)}:{HTTP_PORT}/{payload.name}"
    deadline = time.monotonic() + 15
    while subprocess.run(lab.cmd(1, ["curl", "-sfI", "-o", "/dev/null", url])).returncode:
        if time.monotonic() > deadline or server.poll() is not None:
            stop_process(server)
            raise RuntimeError("the HTTP server did not come up")
        time.sleep(0.1)
    return server


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def run_http(lab: NetLab, targets: int, payload: Path, digest: str, work: Path,
                   timeout: float) -> Outcome:
    server = await asyncio.to_thread(start_http_server, lab, payload, work)
    url = f"http://{lab.ip(0)}:{HTTP_PORT}/{payload.name}"
    try:
        outs = [work / f"http{i}.bin" for i in range(1, targets + 1)]
        t0 = time.perf_counter()
        curls = [await asyncio.create_subprocess_exec(
            *lab.cmd(i, ["curl", "-sSf", "-o", str(outs[i - 1]), url]))
            for i in range(1, targets + 1)]

        async def finished(p: asyncio.subprocess.Process) -> tuple[int, float]:
            rc = await p.wait()
            return rc, time.perf_counter() - t0

        results = await asyncio.wait_for(asyncio.gather(*(finished(p) for p in curls)), timeout)
        finish = sorted(t for _, t in results)
        ok = all(rc == 0 for rc, _ in results) and await copies_match(outs, digest)
        return Outcome(finish[-1], ok, "" if ok else "a fetch failed", finish=finish)
    finally:
        await asyncio.to_thread(stop_process, server)


# --- loopback ----------------------------------------------------------------------------------


@dataclass
class RawTls:
    """One raw single-stream TLS copy (``bench_transfer.raw_tls_copy``)."""

    rate: float  # bytes/s
    cpu_per_gib: float  # both ends


def per_gib(o: Outcome, delivered: int) -> float:
    return o.cpu * GiB / delivered


def round_order(systems: Sequence[str], run: int) -> list[str]:
    """The systems in the order they run in round ``run``: interleaved, so that every system
    sees the same machine load, and rotated, so that none always runs first or last (on this
    machine the later system of a round measured faster, whatever it was)."""
    k = run % len(systems) if systems else 0
    return [*systems[k:], *systems[:k]]


async def loopback_scenario(size_mb: int, targets: int, runs: int, systems: Sequence[str],
                            tmp: Path, variants: dict[str, Path],
                            profile: Path | None, profiler: str) -> dict[str, list[Outcome]]:
    size = size_mb * MiB
    delivered = targets * size
    print(f"\n== loopback: {size_mb} MiB to {targets} target(s)", flush=True)
    srcdir = tmp / "source"
    srcdir.mkdir(exist_ok=True)
    payload = srcdir / f"payload-{size_mb}m.bin"
    await asyncio.to_thread(make_payload, payload, size)
    timeout = max(120.0, 60 * targets * size / GiB)
    results: dict[str, list[Outcome]] = {s: [] for s in systems}
    raw: list[RawTls] = []
    for run in range(runs):
        tls_work = tmp / f"tls-{run}"
        tls_work.mkdir()
        rate, cpu = await asyncio.to_thread(raw_tls_copy, tls_work, size)
        shutil.rmtree(tls_work, ignore_errors=True)
        raw.append(RawTls(rate, cpu * GiB / size))
        print(f"  run {run + 1} {'raw TLS':<16} {rate / GiB:6.2f} GiB/s  "
              f"{raw[-1].cpu_per_gib:5.2f} CPU-s/GiB (both ends)  "
              f"[load {os.getloadavg()[0]:.1f}]", flush=True)
        for system in round_order(systems, run):
            work = tmp / f"{system}-{run}"
            work.mkdir()
            prof = profile / f"{size_mb}m{targets}-{system}-{run + 1}" if profile else None
            try:
                code = variants.get(system)
                out = await run_blobmesh(None, targets, payload, work, timeout, code,
                                         profile=prof, profiler=profiler)
                out.code = code_fingerprint(code).rsplit(" ", 1)[-1]
            except (TimeoutError, RuntimeError, OSError) as exc:
                out = Outcome(float("nan"), False, f"{type(exc).__name__}: {exc}")
            finally:
                shutil.rmtree(work, ignore_errors=True)
            results[system].append(out)
            nodes = " ".join(f"{c:.1f}" for c in out.node_cpu)
            print(f"  run {run + 1} {system:<16} {out.seconds:6.2f}s  "
                  f"{size / out.seconds / GiB:5.2f} GiB/s per target "
                  f"({size / out.seconds / rate:.2f}x raw TLS)  "
                  f"{per_gib(out, delivered):5.2f} CPU-s/GiB delivered "
                  f"(node CPU s, source first: {nodes})  code {out.code}"
                  + ("" if out.ok else f"  FAILED: {out.note}")
                  + f"  [load {os.getloadavg()[0]:.1f}]", flush=True)
    for f in srcdir.iterdir():
        f.unlink()

    raw_rate = statistics.median(r.rate for r in raw)
    print(f"\nloopback {size_mb} MiB -> {targets} target(s); raw TLS {raw_rate / GiB:.2f} GiB/s, "
          f"{statistics.median(r.cpu_per_gib for r in raw):.2f} CPU-s/GiB (medians of {runs})")
    print(f"{'system':<17} {'median s':>9} {'GiB/s/target':>13} {'x raw TLS':>10} "
          f"{'CPU-s/GiB':>10}  runs (x raw TLS, CPU-s/GiB)")
    for system, outs in results.items():
        good = [(o, r) for o, r in zip(outs, raw, strict=True) if o.ok]
        if not good:
            print(f"{system:<17} every run failed")
            continue
        ratio = statistics.median(size / o.seconds / r.rate for o, r in good)
        cpu = statistics.median(per_gib(o, delivered) for o, _ in good)
        secs = statistics.median(o.seconds for o, _ in good)
        runs_txt = ", ".join(f"{size / o.seconds / r.rate:.2f} {per_gib(o, delivered):.2f}"
                             if o.ok else "failed" for o, r in zip(outs, raw, strict=True))
        print(f"{system:<17} {secs:9.2f} {size / secs / GiB:13.2f} {ratio:10.2f} "
              f"{cpu:10.2f}  [{runs_txt}]")
        if targets == 1:
            print(f"verdict: {system} {ratio:.2f}x raw single-stream TLS " +
                  ("(goal >= 0.4x: met)" if ratio >= 0.4 else "(goal >= 0.4x: MISSED)"))
        else:
            print(f"verdict: {system} {cpu:.2f} CPU-s per GiB delivered " +
                  ("(goal <= 3: met)" if cpu <= 3 else "(goal <= 3: MISSED)"), flush=True)
    return results


async def bench_loopback(args: argparse.Namespace, tmp: Path) -> None:
    print(f"loopback: nodes on 127.0.0.1, homes in {tmp}; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"blobmesh swarm code: {code_fingerprint()}", flush=True)
    variants: dict[str, Path] = args.variants
    for system, code in variants.items():
        print(f"{system} swarm code: {code_fingerprint(code)}", flush=True)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    systems = [*(["blobmesh"] if "blobmesh" in args.only else []), *variants]
    for size_mb, targets in args.scenarios:
        await loopback_scenario(size_mb, targets, args.runs, systems, tmp, variants,
                                args.profile, args.profiler)


# --- the benchmark -----------------------------------------------------------------------------


def slow_hosts(targets: int) -> list[int]:
    """With ``--slow-mbit``: every other target (hosts 2, 4, ...), as the simulator's
    heterogeneous scenario slows every other target."""
    return list(range(2, targets + 1, 2))


def describe(o: Outcome, size: int) -> str:
    first, last = (o.finish[0], o.finish[-1]) if o.finish else (0.0, 0.0)
    text = f"{o.seconds:7.2f}s  targets done {first:.1f}..{last:.1f}s"
    if o.first_byte:
        text += f"  first progress {o.first_byte:.2f}s"
    if o.cpu:
        text += f"  node CPU {o.cpu:.0f}s"
    if o.uploads:
        copies = " ".join(f"{u / size:.2f}" for u in o.uploads)
        text += f"  uploaded (copies of F) source,targets: {copies}"
    if o.uploads:
        text += f"  resets {o.resets}  expired requests {o.expired}  bans {o.banned}"
    if o.code:
        text += f"  code {o.code}"
    if not o.ok:
        text += f"  FAILED: {o.note}"
    elif o.note:
        text += f"  ({o.note})"
    return text


async def scenario(lab: NetLab, size_mb: int, targets: int, runs: int, rate_bps: float,
                   slow_bps: float | None,
                   systems: Sequence[str], tmp: Path, lt_tuning: str,
                   variants: dict[str, Path], profile: Path | None = None,
                   profiler: str = "py-spy") -> dict[str, list[Outcome]]:
    size = size_mb * MiB
    slow = set(slow_hosts(targets)) if slow_bps else set()
    rates = [slow_bps if slow_bps and host in slow else rate_bps
             for host in range(1, targets + 1)]
    bound = kumar_ross(size, rate_bps, rates, rates)
    how = f"F/R at R = {rate_bps * 8 / 1e6:.1f} Mbit/s measured" if not slow else \
        f"R = {rate_bps * 8 / 1e6:.1f} Mbit/s, hosts {sorted(slow)} at " \
        f"{(slow_bps or 0) * 8 / 1e6:.1f} Mbit/s, measured"
    print(f"\n== {size_mb} MiB to {targets} targets; bound {bound:.2f}s ({how})", flush=True)
    srcdir = tmp / "source"
    srcdir.mkdir(exist_ok=True)
    payload = srcdir / f"payload-{size_mb}m.bin"
    await asyncio.to_thread(make_payload, payload, size)
    digest = await asyncio.to_thread(file_digest, payload)
    torrent = make_torrent(payload, choose_piece_size(size)) if "libtorrent" in systems \
        else None
    timeout = max(120.0, 6 * targets * size / min(rates))
    results: dict[str, list[Outcome]] = {s: [] for s in systems}
    for run in range(runs):
        for system in round_order(systems, run):
            work = tmp / f"{system}-{run}"
            work.mkdir()
            try:
                if system.startswith("blobmesh"):
                    code = variants.get(system)
                    hostile = system.partition("+")[2]
                    prof = profile / f"{size_mb}m{targets}-{system}-{run + 1}" \
                        if profile else None
                    out = await run_blobmesh(lab, targets, payload, work, timeout, code,
                                             hostile, prof, profiler)
                    out.code = code_fingerprint(code).rsplit(" ", 1)[-1]
                elif system == "libtorrent":
                    assert torrent is not None
                    out = await run_libtorrent(lab, targets, torrent, payload, digest, work,
                                               timeout, lt_tuning)
                else:
                    out = await run_http(lab, targets, payload, digest, work, timeout)
            except (TimeoutError, RuntimeError, OSError) as exc:
                out = Outcome(float("nan"), False, f"{type(exc).__name__}: {exc}")
            finally:
                shutil.rmtree(work, ignore_errors=True)
            results[system].append(out)
            print(f"  run {run + 1} {system:<14} {describe(out, size)}  "
                  f"[load {os.getloadavg()[0]:.1f}]", flush=True)
    for f in srcdir.iterdir():
        f.unlink()

    print(f"\n{size_mb} MiB -> {targets} targets @ {rate_bps * 8 / 1e6:.1f} Mbit/s")
    print(f"{'system':<15} {'median s':>9} {'bound s':>8} {'ratio':>6} {'CPU-s/GiB':>9}  runs")
    medians: dict[str, float] = {}
    cpu: dict[str, float] = {}  # CPU seconds of every node process per GiB delivered
    for system, outs in results.items():
        good = [o.seconds for o in outs if o.ok]
        med = statistics.median(good) if good else float("nan")
        medians[system] = med
        cpus = [per_gib(o, targets * size) for o in outs if o.ok and o.cpu]
        cpu[system] = statistics.median(cpus) if cpus else float("nan")
        runs_txt = ", ".join(f"{o.seconds:.2f}" + ("" if o.ok else "!") for o in outs)
        print(f"{system:<15} {med:9.2f} {bound:8.2f} {med / bound:6.2f} {cpu[system]:9.2f}  "
              f"[{runs_txt}]")
    for system in (s for s in medians if s.startswith("blobmesh")):
        good = [o.seconds for o in results[system] if o.ok]
        resets = sum(o.resets for o in results[system])
        tail = f"tail: {system} protocol resets {resets} (goal 0)"
        if len(good) >= 3:
            worst = max(good) / statistics.median(good)
            tail += f"; worst {worst:.2f}x the median " + \
                ("(goal <= 1.1x: met)" if worst <= 1.1 else "(goal <= 1.1x: MISSED)")
        print(tail)
        if "+" in system and "blobmesh" in medians:
            ratio = medians[system] / medians["blobmesh"]
            print(f"verdict: {system} {ratio:.2f}x the clean run " +
                  ("(goal <= 1.2x: met)" if ratio <= 1.2 else "(goal <= 1.2x: MISSED)"))
            continue
        bm = medians[system]
        verdict = f"verdict: {system} {bm / bound:.2f}x the bound " + \
            ("(goal <= 1.15x: met)" if bm / bound <= 1.15 else "(goal <= 1.15x: MISSED)")
        if "libtorrent" in medians:
            lt_t = medians["libtorrent"]
            verdict += f"; {lt_t / bm:.2f}x libtorrent's speed " + \
                ("(faster: met)" if bm < lt_t else "(faster than libtorrent: MISSED)")
            ratio = cpu[system] / cpu["libtorrent"]
            verdict += f"; CPU per GiB {ratio:.2f}x libtorrent's " + \
                ("(goal <= 1: met)" if ratio <= 1 else "(goal <= 1: MISSED)")
        print(verdict, flush=True)
    return results


def code_fingerprint(code: Path | None = None) -> str:
    """Which swarm code the nodes run (the lead may be editing it)."""
    import blobmesh.distribution.swarm as swarm_mod

    where = code / "blobmesh" / "distribution" if code is not None else \
        Path(str(swarm_mod.__file__)).parent
    h = hashlib.blake2b(digest_size=4)
    for name in ("swarm.py", "picker.py", "service.py", "peerwire.py", "scheduler.py",
                 "../transport/io.py", "../transport/connection.py", "../store/partial.py",
                 "../hashing/tree.py"):
        h.update((where / name).read_bytes())
    return f"{where} ({h.hexdigest()})"


async def bench(args: argparse.Namespace, lab: NetLab, tmp: Path) -> None:
    lab.build()
    lab.wait_reachable()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    last_fast = max(h for h in range(1, lab.hosts) if h not in lab.slow_mbit)
    probes = [lab.measure_mbit(0, 1), lab.measure_mbit(last_fast, 0)]
    mbit = statistics.mean(probes)
    slow_mbit = lab.measure_mbit(0, min(lab.slow_mbit), size_mb=12) if lab.slow_mbit else None
    print(f"lab: {lab.hosts} hosts, tbf {args.rate_mbit:g} Mbit/s both ends; raw TCP "
          f"goodput {', '.join(f'{p:.1f}' for p in probes)} Mbit/s -> R = {mbit:.1f}"
          + (f"; slow hosts {sorted(lab.slow_mbit)} at {slow_mbit:.1f}" if slow_mbit else "")
          + f"; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"blobmesh swarm code: {code_fingerprint()}", flush=True)
    variants: dict[str, Path] = args.variants
    for system, code in variants.items():
        print(f"{system} swarm code: {code_fingerprint(code)}", flush=True)
    systems = [s for s in SYSTEMS if s in args.only]
    if "blobmesh" in args.only:
        systems[1:1] = [*variants, *(f"blobmesh+{mode}" for mode in args.hostile)]
    for size_mb, targets in args.scenarios:
        await scenario(lab, size_mb, targets, args.runs, mbit * 1e6 / 8,
                       slow_mbit * 1e6 / 8 if slow_mbit else None, systems, tmp,
                       args.lt_tuning, variants, args.profile, args.profiler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int)
    parser.add_argument("--targets", type=int)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--slow-mbit", type=float, default=None,
                        help="every other target (hosts 2, 4, ...) gets links of this rate; "
                             "the bound is then the heterogeneous Kumar-Ross bound")
    parser.add_argument("--only", default=",".join(SYSTEMS),
                        help="comma-separated systems to run, of: " + ", ".join(SYSTEMS))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                        help="also run blobmesh-NAME: nodes import blobmesh from DIR (A/B a "
                             "patched copy of src/ in the same run)")
    parser.add_argument("--hostile", action="append", default=[],
                        choices=("black-hole", "non-reader"),
                        help="also run blobmesh+MODE: one more member that misbehaves")
    parser.add_argument("--quick", action="store_true", help="32 MiB to 3 targets")
    # super-seeding is libtorrent's best here (256 MiB to 7: ~36 s, against ~50 s for lan
    # and ~56 s for hps), so it is the fair default
    parser.add_argument("--lt-tuning", choices=("lan", "hps", "super"), default="super",
                        help="libtorrent settings (see lt_worker)")
    parser.add_argument("--lab-prefix", default="bmbench", help="namespace name prefix")
    parser.add_argument("--loopback", action="store_true",
                        help="blobmesh only, on 127.0.0.1 without namespaces or rate limits, "
                             "against raw TLS measured in the same run (1 GiB -> 1 and "
                             "512 MiB -> 4 unless --size-mb/--targets)")
    parser.add_argument("--home-dir", type=Path, default=Path("/dev/shm"),
                        help="--loopback: where node homes go (default: tmpfs)")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="profile every blobmesh node during each run, into DIR")
    parser.add_argument("--profiler", choices=("py-spy", "perf"), default="py-spy",
                        help="--profile: py-spy (Python stacks of the GIL holder) or perf "
                             "(on-CPU samples, native and kernel)")
    parser.add_argument("--lt-worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--lt-seed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lt_worker:
        torrent, save, ip, peers = args.lt_worker
        lt_worker(torrent, save, ip, [p for p in peers.split(",") if p], args.lt_seed,
                  args.lt_tuning)
        return
    args.only = [s for s in args.only.split(",") if s]  # --only '' --variant ...: just those
    if unknown := set(args.only) - set(SYSTEMS):
        parser.error(f"unknown system(s) in --only: {', '.join(sorted(unknown))}")
    args.variants = {f"blobmesh-{name}": Path(path).resolve()
                     for name, _, path in (v.partition("=") for v in args.variant)}
    if args.loopback:
        if args.size_mb or args.targets:
            args.scenarios = [(args.size_mb or 512, args.targets or 4)]
        else:
            args.scenarios = [(1024, 1), (512, 4)]
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            with tempfile.TemporaryDirectory(prefix="bench-swarm-", dir=args.home_dir) as tmp:
                asyncio.run(bench_loopback(args, Path(tmp)))
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            sys.exit(130)
        return
    if os.geteuid() != 0:
        parser.error("building network namespaces needs root")
    if args.quick:
        args.scenarios = [(args.size_mb or 32, args.targets or 3)]
    elif args.size_mb or args.targets:
        args.scenarios = [(args.size_mb or 256, args.targets or 7)]
    else:
        args.scenarios = [(256, 7), (64, 15)]
    hosts = 1 + max(t for _, t in args.scenarios) + (1 if args.hostile else 0)
    most = max(t for _, t in args.scenarios)
    slow = {h: args.slow_mbit for h in slow_hosts(most)} if args.slow_mbit else {}
    lab = NetLab(hosts=hosts, rate_mbit=args.rate_mbit, prefix=args.lab_prefix, slow_mbit=slow)
    # SIGTERM takes the same way out as Ctrl-C: through every finally below
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-swarm-") as tmp:
            try:
                asyncio.run(bench(args, lab, Path(tmp)))
            finally:
                # also kills whatever still runs inside the lab's namespaces, before its
                # files go
                with contextlib.suppress(Exception):
                    lab.cleanup()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
