"""The probes of issue 10 ("Trust and failure semantics") against real ``node run`` processes
on loopback, each printed next to the figure the issue measured before.

    .venv/bin/python benchmarks/probe_trust.py [--only strangers,transfer-flood,...]
        [--strangers 400] [--requests 200] [--size-mb 16] [--black-hole-mb 64] [--keep DIR]

Probes (all by default):

``strangers``       N TLS connections to one node, each from a fresh identity that never
                    proves the space secret: how many the node took, its threads and RSS at
                    the peak and after the 10 s admission timeout.
``transfer-flood``  an unadmitted peer sends N transfer requests with 1 MiB vouchers: rows and
                    bytes added to the node's ``transfer.sqlite``.
``non-reader``      a member (``hostile_node.py non-reader``) asks the source for every piece
                    of a first distribution and never reads; then the source distributes
                    another ``--size-mb`` blob to another target: its time, against the same
                    run without the hostile member.
``black-hole``      a member (``hostile_node.py black-hole``) claims every piece and answers no
                    request; ``--black-hole-mb`` to 3 targets (scope all, the source at 8 MiB/s):
                    time until the 3 real targets hold it, the states they went through, bans;
                    against the same run without it.
``disk-full``       (root: a tmpfs) a target whose home has ~6 MiB free receives 16 MiB: its
                    state and reason, "disk full" and traceback lines in its log, and the time
                    to complete once space is freed.
``corrupt``         ``distribute`` of a blob whose data file is corrupt on the source; and a
                    target holding a corrupt copy of the distributed blob.
``modes``           the file modes in a node's home after a distribution.

Loopback only, no network namespaces: timings are indicative (the issue's were on loopback
too, except the tail stalls, which ``bench_swarm.py`` measures).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import sqlite3
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from blobmesh.distribution.model import DistributionState, TargetState
from blobmesh.hashing import BlobId
from blobmesh.node.client import NodeClient
from blobmesh.node.fleet import Fleet, FleetNode
from blobmesh.store import Store
from blobmesh.transfer.messages import PROTOCOL as TRANSFER
from blobmesh.transfer.messages import Error, Request, Response, decode, encode
from blobmesh.transport import Endpoint, Identity, Ticket

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.util import add_blob, flip_byte, holds, stranger_connection, threads_and_rss, tmpfs

MiB = 1024 * 1024
HOSTILE_NODE = Path(__file__).with_name("hostile_node.py")
PROBES = ("strangers", "transfer-flood", "non-reader", "black-hole", "disk-full", "corrupt",
          "modes")


@dataclass
class Row:
    probe: str
    before: str  # the figure
    after: str


# --- a loopback fleet that can include a hostile member --------------------------------------


class ProbeFleet(Fleet):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.hostile: dict[int, str] = {}  # node index -> mode of hostile_node.py

    def _popen(self, node: FleetNode) -> None:
        if node.index not in self.hostile:
            super()._popen(node)
            return
        seed = next(n for n in self.nodes if n.running and n is not node and n.ticket)
        cmd = [sys.executable, str(HOSTILE_NODE), self.hostile[node.index], "--home",
               str(node.home), *node.args, "--bootstrap", seed.ticket]
        log_path = self.root / f"node{node.index}.{len(node.logs)}.log"
        node.logs.append(log_path)
        with open(log_path, "wb") as log:
            node.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                         stdin=subprocess.DEVNULL)


def pid_of(node: FleetNode) -> int:
    assert node.proc is not None
    return node.proc.pid


def corrupt_file(home: Path, blob: BlobId, offset: int) -> None:
    with Store(home) as store:
        flip_byte(store.layout.data_path(blob), offset)


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples (``name`` and ``name{...}``)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


async def follow(client: NodeClient, handle: str, done: Callable[[object], bool],
                 timeout: float) -> tuple[float, list[tuple[float, str, str, str]]]:
    """Poll a distribution's status every 0.1 s until ``done(status)``; the time it took and
    every (time, node, state, reason) change of a target, and of the distribution."""
    t0 = time.perf_counter()
    seen: dict[str, tuple[str, str]] = {}
    changes: list[tuple[float, str, str, str]] = []
    async with asyncio.timeout(timeout):
        while True:
            s = await client.status(handle)
            now = time.perf_counter() - t0
            for key, state, reason in [("distribution", str(s.state), ""),
                                       *((t.node.short(), str(t.state), t.reason)
                                         for t in s.targets)]:
                if seen.get(key) != (state, reason):
                    seen[key] = (state, reason)
                    changes.append((now, key, state, reason))
            if done(s):
                return time.perf_counter() - t0, changes
            await asyncio.sleep(0.1)


@contextlib.contextmanager
def fleet_in(root: Path, keep: bool) -> Iterator[ProbeFleet]:
    root.mkdir(parents=True)
    fleet = ProbeFleet(root)
    try:
        yield fleet
    finally:
        fleet.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


# --- probes --------------------------------------------------------------------------------------


def _still_open(sock: ssl.SSLSocket) -> bool:
    """Whether the node still keeps the connection (what it sent meanwhile is drained)."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
        return False  # EOF
    except ssl.SSLWantReadError:
        return True
    except OSError:
        return False


async def probe_strangers(root: Path, args: argparse.Namespace) -> list[Row]:
    n = args.strangers
    with fleet_in(root, bool(args.keep)) as fleet:
        node = fleet.add()
        fleet.start()
        await asyncio.sleep(1.0)
        host, port = Ticket.parse(node.ticket).addrs[0]
        threads0, rss0 = threads_and_rss(pid_of(node))
        socks: list[ssl.SSLSocket | None] = []
        t0 = time.monotonic()
        for _ in range(n // 20):  # 20 at a time
            socks += await asyncio.gather(*(asyncio.to_thread(stranger_connection,
                                                              (host, int(port)))
                                            for _ in range(20)))
        dialed = time.monotonic() - t0
        held = sum(s is not None for s in socks)
        threads1, rss1 = threads_and_rss(pid_of(node))
        await asyncio.sleep(max(0.0, 12.0 - (time.monotonic() - t0)))  # admission timeout 10 s
        alive = sum(_still_open(s) for s in socks if s is not None)
        threads2, rss2 = threads_and_rss(pid_of(node))
        async with NodeClient(node.home) as client:
            text = await client.metrics()
        for s in socks:
            if s is not None:
                s.close()
    refused = metric(text, "blobmesh_transport_connections_refused_total")
    return [Row(f"{n} strangers: connections taken", "400 (all accepted)",
                f"{held} taken at once, {refused:.0f} refused (cap), {alive} still open "
                f"after 12 s ({dialed:.1f} s to dial)"),
            Row(f"{n} strangers: node threads", "806",
                f"{threads0} idle, {threads1} at the peak, {threads2} after 12 s"),
            Row(f"{n} strangers: node RSS", "506 MiB",
                f"{rss0 / MiB:.0f} MiB idle, {rss1 / MiB:.0f} at the peak, "
                f"{rss2 / MiB:.0f} after 12 s")]


def transfer_db(home: Path) -> tuple[int, int]:
    """(rows, bytes) of a home's transfer.sqlite (with its WAL)."""
    size = sum(p.stat().st_size for p in home.glob("transfer.sqlite*"))
    with contextlib.closing(sqlite3.connect(f"file:{home / 'transfer.sqlite'}?mode=ro",
                                            uri=True)) as db:
        rows: int = db.execute("SELECT count(*) FROM channels").fetchone()[0]
    return rows, size


async def probe_transfer_flood(root: Path, args: argparse.Namespace) -> list[Row]:
    n = args.requests
    with fleet_in(root, bool(args.keep)) as fleet:
        node = fleet.add()
        fleet.start()
        await asyncio.sleep(1.0)
        ticket = Ticket.parse(node.ticket)
        rows0, bytes0 = transfer_db(node.home)
        voucher = os.urandom(MiB)
        answers: list[str] = []
        async with await Endpoint.start(Identity.generate()) as stranger:
            stranger.add_peer_addresses(ticket.node_id, ticket.addrs)

            async def one(i: int) -> None:
                try:
                    stream = await stranger.open_stream(ticket.node_id, TRANSFER)
                    await stream.send(encode(Request(i, True, os.urandom(32), "pull", voucher)))
                    answer = decode(await stream.recv())
                    stream.reset("done")
                    answers.append("refused: " + answer.message if isinstance(answer, Error)
                                   else "accepted" if isinstance(answer, Response) and
                                   answer.accepted else "rejected")
                except Exception as exc:  # a reset or a closed connection: refused too
                    answers.append(f"{type(exc).__name__}")

            t0 = time.monotonic()
            for batch in range(n // 20):
                await asyncio.gather(*(one(batch * 20 + i) for i in range(20)))
            took = time.monotonic() - t0
        await asyncio.sleep(1.5)  # a checkpoint could only shrink it
        rows1, bytes1 = transfer_db(node.home)
    kinds: dict[str, int] = {}
    for a in answers:
        kinds[a] = kinds.get(a, 0) + 1
    top = ", ".join(f"{v}x {k!r}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return [Row(f"{n} transfer requests from an unadmitted peer (1 MiB vouchers)",
                "+342 MiB in transfer.sqlite, a row each",
                f"+{rows1 - rows0} rows, {(bytes1 - bytes0) / 1024:+.0f} KiB "
                f"(answers: {top}; {took:.1f} s)")]


async def timed_distribution(fleet: ProbeFleet, size: int, scope: str, real: list[FleetNode],
                             timeout: float) -> tuple[float, list[tuple[float, str, str, str]],
                                                      bool, BlobId]:
    """Distribute ``size`` bytes from node 0 to ``scope``; time until every node of ``real``
    completed (a hostile member never does)."""
    src = fleet.nodes[0]
    blob = add_blob(src, size)
    ids = {Ticket.parse(n.ticket).node_id for n in real}
    async with NodeClient(src.home) as client:
        handle = str((await client.distribute(str(blob), scope, "normal")).handle)

        def done(s: object) -> bool:
            targets = getattr(s, "targets", ())
            return sum(t.node in ids and t.state is TargetState.COMPLETED
                       for t in targets) == len(ids)

        try:
            took, changes = await follow(client, handle, done, timeout)
            ok = True
        except TimeoutError:
            took, changes, ok = timeout, [], False
    return took, changes, ok and all(holds(n, blob) for n in real), blob


def bad_states(changes: list[tuple[float, str, str, str]]) -> list[str]:
    """Terminal or failure states seen before the end (the issue saw finished-with-failures)."""
    return [f"{key} {state} at {t:.1f}s ({reason})" for t, key, state, reason in changes
            if state in (str(TargetState.FAILED), str(DistributionState.FINISHED_WITH_FAILURES))]


async def probe_non_reader(root: Path, args: argparse.Namespace) -> list[Row]:
    size = args.size_mb * MiB
    results = {}
    for hostile in (False, True):
        with fleet_in(root / f"nr-{hostile}", bool(args.keep)) as fleet:
            src, first, second = fleet.add(), fleet.add(), fleet.add()
            if hostile:
                fleet.hostile[fleet.add().index] = "non-reader"
            fleet.start()
            await fleet.wait_converged(30)
            # a first distribution the non-reader attacks: it asks the source (and the others)
            # for every piece and never reads
            await timed_distribution(fleet, 32 * MiB, f"node:{first.node_id}", [first], 60)
            await asyncio.sleep(2.0)
            async with NodeClient(src.home) as client:
                conns = metric(await client.metrics(), "blobmesh_swarm_connections")
            took, changes, ok, _ = await timed_distribution(
                fleet, size, f"node:{second.node_id}", [second], 90)
            banned_at = -1.0
            t0 = time.monotonic()
            async with NodeClient(src.home) as client:
                while hostile and time.monotonic() - t0 < 40:  # send_timeout is 20 s
                    text = await client.metrics()
                    if metric(text, "blobmesh_swarm_peers_banned_total") > 0:
                        banned_at = time.monotonic() - t0
                        break
                    await asyncio.sleep(0.5)
                text = await client.metrics()
            bans = re.findall(r'^blobmesh_swarm_peers_banned_total\{reason="([^"]+)"\} (\S+)$',
                              text, re.M)
            results[hostile] = (took, ok, conns, banned_at,
                                [f"{r}: {float(v):.0f}" for r, v in bans if float(v)],
                                bad_states(changes))
    clean, bad = results[False], results[True]
    return [Row(f"another target's {args.size_mb} MiB with a non-reading member present",
                "0.5 s clean; failed after 61 s",
                f"{bad[0]:.2f} s ({'verified' if bad[1] else 'NOT completed'}); clean run "
                f"{clean[0]:.2f} s ({'ok' if clean[1] else 'NOT ok'}); {bad[0] / clean[0]:.2f}x; "
                f"source's swarm connections before it: {bad[2]:.0f} (clean run {clean[2]:.0f});"
                f" the source banned it {bad[3]:.0f} s after ({bad[4]}); failure states "
                f"seen: {bad[5] or 'none'}")]


async def probe_black_hole(root: Path, args: argparse.Namespace) -> list[Row]:
    size = args.black_hole_mb * MiB
    results = {}
    for hostile in (False, True):
        with fleet_in(root / f"bh-{hostile}", bool(args.keep)) as fleet:
            fleet.add(extra=["--upload-rate", str(8 * MiB)])
            real = [fleet.add() for _ in range(3)]
            if hostile:
                fleet.hostile[fleet.add().index] = "black-hole"
            fleet.start()
            await fleet.wait_converged(30)
            took, changes, ok, _ = await timed_distribution(fleet, size, "all", real, 180)
            texts = []
            for n in real:
                async with NodeClient(n.home) as client:
                    texts.append(await client.metrics())
            bans = sum(metric(t, "blobmesh_swarm_peers_banned_total") for t in texts)
            expired = sum(metric(t, "blobmesh_swarm_requests_expired_total") for t in texts)
            resets = sum(metric(t, "blobmesh_swarm_protocol_errors_total") for t in texts)
            reasons = sorted({r for _, key, _, r in changes if key != "distribution" and r})
            results[hostile] = (took, ok, bans, expired, resets, bad_states(changes), reasons)
    clean, bad = results[False], results[True]
    return [Row(f"{args.black_hole_mb} MiB to 3 targets with a black-hole member "
                "(source 8 MiB/s)",
                "finished-with-failures, then complete at ~137 s; never banned",
                f"{bad[0]:.1f} s ({'all verified' if bad[1] else 'NOT completed'}); clean run "
                f"{clean[0]:.1f} s; {bad[0] / clean[0]:.2f}x; bans {bad[2]:.0f}, expired "
                f"requests {bad[3]:.0f}, protocol resets {bad[4]:.0f}; failure states seen: "
                f"{bad[5] or 'none'}; reasons shown: {bad[6][:3]}")]


async def probe_disk_full(root: Path, args: argparse.Namespace) -> list[Row]:
    if os.geteuid() != 0:
        return [Row("disk full", "", "skipped: mounting a tmpfs needs root")]
    await asyncio.to_thread(root.mkdir, parents=True)
    try:
        with tmpfs(root / "node1", 64) as home:
            fleet = ProbeFleet(root)
            try:
                src, dst = fleet.add(), fleet.add()
                assert dst.home == home
                fleet.start()
                await fleet.wait_converged(30)
                filler = home / "filler"
                free = shutil.disk_usage(home).free
                filler.write_bytes(b"\0" * (free - 6 * MiB))
                blob = add_blob(src, 16 * MiB)
                dst_id = Ticket.parse(dst.ticket).node_id
                async with NodeClient(src.home) as client:
                    handle = str((await client.distribute(str(blob), "all", "normal")).handle)

                    def waiting(s: object) -> bool:
                        return any(t.node == dst_id and t.state is TargetState.WAITING_DISK
                                   for t in getattr(s, "targets", ()))

                    try:
                        t_wait, _ = await follow(client, handle, waiting, 60)
                    except TimeoutError:
                        t_wait = -1.0
                    state = (await client.status(handle)).targets[0]
                    await asyncio.sleep(10)  # minutes before; 10 s of waiting is enough here
                    later = (await client.status(handle)).targets[0]
                    log = dst.stderr()
                    full_lines = sum("disk full" in line for line in log.splitlines())
                    tracebacks = log.count("Traceback")
                    filler.unlink()

                    def completed(s: object) -> bool:
                        return getattr(s, "state", None) is DistributionState.COMPLETED

                    try:
                        t_done, _ = await follow(client, handle, completed, 60)
                    except TimeoutError:
                        t_done = -1.0
                ok = holds(dst, blob)
            finally:
                fleet.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return [Row("target disk full (16 MiB into ~6 MiB free)",
                "'transferring 56 MiB' for minutes, no reason; ~5,800 traceback lines",
                f"'{state.state}' ({state.reason!r}) after {t_wait:.1f} s at "
                f"{state.bytes_done / MiB:.1f} MiB; 10 s later '{later.state}' "
                f"({later.reason!r}); log: {full_lines} 'disk full' line(s), "
                f"{tracebacks} tracebacks"),
            Row("disk freed", "", f"completed {t_done:.1f} s after the filler was removed "
                                  f"({'verified' if ok else 'NOT verified'})")]


async def probe_corrupt(root: Path, args: argparse.Namespace) -> list[Row]:
    with fleet_in(root, bool(args.keep)) as fleet:
        src, dst = fleet.add(), fleet.add()
        fleet.start()
        await fleet.wait_converged(30)
        blob = add_blob(src, 8 * MiB)
        corrupt_file(src.home, blob, 5 * MiB)
        cli = [sys.executable, "-m", "blobmesh.cli.main", "--home", str(src.home),
               "distribute", str(blob), "--to", "all", "-q"]
        r = await asyncio.to_thread(subprocess.run, cli, capture_output=True, text=True,
                                    timeout=60)
        with Store(src.home) as store:
            still = store.has(blob)
        quarantined = len(list((src.home / "quarantine").iterdir()))
        message = (r.stderr.strip().splitlines() or [""])[-1][:110]
        # a target that holds a corrupt copy of what is distributed
        data = os.urandom(8 * MiB)
        good = add_blob(src, 0, data)
        add_blob(dst, 0, data)
        corrupt_file(dst.home, good, 3 * MiB)
        took = 0.0
        async with NodeClient(src.home) as client:
            handle = str((await client.distribute(str(good), "all", "normal")).handle)

            def completed(s: object) -> bool:
                return getattr(s, "state", None) is not DistributionState.ACTIVE

            try:
                took, _ = await follow(client, handle, completed, 60)
                final = str((await client.status(handle)).state)
            except TimeoutError:
                final = "still active after 60 s"
        ok = holds(dst, good)
        async with NodeClient(dst.home) as client:
            copies = metric(await client.metrics(), "blobmesh_swarm_corrupt_copies_total")
    return [Row("distribute a blob whose source copy is corrupt",
                "accepted; targets stalled at 63/64, 'no progress'",
                f"exit {r.returncode}: {message!r}; blob still in the store: {still}; "
                f"{quarantined} file(s) in quarantine/"),
            Row("a target holding a corrupt copy",
                "counted as a completed target",
                f"distribution {final} in {took:.1f} s; the target's copy verifies: {ok}; "
                f"its corrupt copies quarantined: {copies:.0f}")]


async def probe_modes(root: Path, args: argparse.Namespace) -> list[Row]:
    with fleet_in(root, bool(args.keep)) as fleet:
        fleet.add()
        dst = fleet.add()
        fleet.start()
        await fleet.wait_converged(30)
        await timed_distribution(fleet, 2 * MiB, "all", [dst], 60)
        modes: dict[str, list[str]] = {}
        for path in sorted([dst.home, *dst.home.rglob("*")]):
            mode = stat.S_IMODE(path.lstat().st_mode)
            rel = str(path.relative_to(dst.home)) or "."
            kind = "dir" if path.is_dir() else "sock" if path.is_socket() else "file"
            if rel.startswith("blobs/") and kind == "file":
                rel = "blobs/**/" + ("*.pieces" if rel.endswith(".pieces") else "<blob>")
            elif rel.startswith("blobs/"):
                rel = "blobs/*/"
            modes.setdefault(f"{mode:o} {kind}", [])
            if rel not in modes[f"{mode:o} {kind}"]:
                modes[f"{mode:o} {kind}"].append(rel)
    return [Row("file modes of a target's home after a distribution",
                "blobs and databases 0644 in a 0755 home",
                "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(modes.items())))]


PROBE_FUNCS = {"strangers": probe_strangers, "transfer-flood": probe_transfer_flood,
               "non-reader": probe_non_reader, "black-hole": probe_black_hole,
               "disk-full": probe_disk_full, "corrupt": probe_corrupt, "modes": probe_modes}


async def main_async(args: argparse.Namespace) -> int:
    only = args.only.split(",") if args.only else list(PROBES)
    unknown = set(only) - set(PROBES)
    if unknown:
        print(f"unknown probe(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="probe-trust-", dir=args.keep))
    rows: list[Row] = []
    for name in only:
        print(f"# {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            rows += await PROBE_FUNCS[name](base / name, args)
        except Exception as exc:  # one broken probe does not hide the others' figures
            rows.append(Row(name, "", f"PROBE ERROR {type(exc).__name__}: {exc}"))
        print(f"#   {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    width = max(len(r.probe) for r in rows)
    bwidth = max(len(r.before) for r in rows)
    print(f"{'probe':<{width}}  {'before (issue 10)':<{bwidth}}  after")
    for r in rows:
        print(f"{r.probe:<{width}}  {r.before:<{bwidth}}  {r.after}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Issue 10's trust and failure probes against real node processes on "
                    "loopback; prints a table: probe, the issue's figure before, after.",
        epilog="probes: " + ", ".join(PROBES))
    parser.add_argument("--only", default="", help="comma-separated probes (default: all)")
    parser.add_argument("--strangers", type=int, default=400,
                        help="connections from fresh identities (default 400)")
    parser.add_argument("--requests", type=int, default=200,
                        help="transfer requests of the unadmitted peer (default 200)")
    parser.add_argument("--size-mb", type=int, default=16,
                        help="blob size of the non-reader runs (default 16)")
    parser.add_argument("--black-hole-mb", type=int, default=64,
                        help="blob size of the black-hole runs (default 64: longer than the "
                             "6 s request deadline)")
    parser.add_argument("--keep", default=None,
                        help="work under this directory and keep the node homes and logs")
    sys.exit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
