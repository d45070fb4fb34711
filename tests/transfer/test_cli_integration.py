"""``serve`` / ``get`` / ``push`` as real processes over real TLS sockets, with SIGKILLs."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobmesh.hashing import BlobId
from blobmesh.store import Bitfield, LeaseId, Store

SIZE = 64 * 1024 * 1024
WINDOW = 8 * 1024 * 1024
"""The window the tests run with (``--window``): what a restart may re-send at most."""

pytestmark = pytest.mark.slow


def cli(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "blobmesh.cli.main", "--home", str(home), *args]


def get_cmd(home: Path, blob_id: BlobId, ticket: str, *extra: str) -> list[str]:
    return cli(home, "get", str(blob_id), "--window", "8", "--from", ticket, *extra)


def start_get_to_interrupt(cmd: list[str]) -> subprocess.Popen[bytes]:
    """A ``get`` that the test interrupts at half: run at the lowest CPU priority, so that on
    a loaded machine the watching test still sees half before the second half arrives."""
    return subprocess.Popen(["nice", "-n", "19", *cmd],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """``blobmesh serve`` in the background; its stderr goes to a file."""

    def __init__(self, home: Path, port: int, *extra: str) -> None:
        self.home = home
        self.log = home.parent / f"{home.name}-serve.log"
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(cli(home, "serve", "--listen", f"127.0.0.1:{port}",
                                             "--window", "8", *extra),
                                         stdout=subprocess.PIPE, stderr=err)
        assert self.proc.stdout is not None
        self.ticket = self.proc.stdout.readline().decode().strip()
        assert self.ticket.startswith("bmt1"), self.log.read_text()

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        return self.log.read_text()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, BlobId]:
    home = tmp_path / "a"
    with Store(home) as store:
        info = store.add_bytes(os.urandom(SIZE), LeaseId.new("test"))
    return home, info.blob_id


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    running: list[Server] = []
    yield running
    for s in running:
        s.kill()


def present(home: Path, blob_id: BlobId) -> int:
    """Bytes of the blob present in ``home`` (read without the store, so no locks are held)."""
    try:
        with sqlite3.connect(f"file:{home / 'store.sqlite'}?mode=ro", uri=True) as db:
            row = db.execute("SELECT size, piece_size, have FROM blobs WHERE id=?",
                             (blob_id.digest,)).fetchone()
    except sqlite3.OperationalError:
        return 0
    if row is None:
        return 0
    size, piece, have = int(row[0]), int(row[1]), bytes(row[2])
    return Bitfield(-(-size // piece), have).count() * piece


def wait_for_half(home: Path, blob_id: BlobId, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while present(home, blob_id) < SIZE // 2:
        assert proc.poll() is None, "the transfer ended before half"
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_get_killed_at_half_resumes(tmp_path: Path, blob: tuple[Path, BlobId],
                                    servers: list[Server]) -> None:
    a, bid = blob
    b = tmp_path / "b"
    srv = Server(a, free_port())
    servers.append(srv)
    get = start_get_to_interrupt(get_cmd(b, bid, srv.ticket))
    wait_for_half(b, bid, get)
    get.kill()
    get.wait()
    kept = present(b, bid)
    assert SIZE // 2 <= kept < SIZE
    out = tmp_path / "out.bin"
    done = subprocess.run(get_cmd(b, bid, srv.ticket, "-o", str(out), "--json"),
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(done.stdout)
    assert summary["restarts"] == 1 and summary["bytes"] == SIZE
    with Store(a) as sa:
        assert out.read_bytes() == sa.get_data(bid, LeaseId.new("t"))
    log = srv.stop()
    complete = [line for line in log.splitlines() if "Complete:" in line]
    assert len(complete) == 1, log
    wire = int(complete[0].split("wire=")[1].split()[0])
    # the sender re-sent at most its in-flight window
    print(f"receiver killed at {kept} bytes kept: sender re-sent {wire - SIZE} bytes")
    assert SIZE <= wire <= SIZE + WINDOW, complete[0]


def test_serve_killed_at_half_resumes(tmp_path: Path, blob: tuple[Path, BlobId],
                                      servers: list[Server]) -> None:
    a, bid = blob
    b = tmp_path / "b"
    port = free_port()
    servers.append(Server(a, port))
    get = start_get_to_interrupt(get_cmd(b, bid, servers[0].ticket, "--json"))
    wait_for_half(b, bid, get)
    servers[0].kill()
    servers.append(Server(a, port))  # back on the same address, with the same identity
    out, err = get.communicate(timeout=60)
    assert get.returncode == 0, err.decode()
    summary = json.loads(out)
    assert summary["restarts"] >= 1 and summary["bytes"] == SIZE
    # the receiver got at most the in-flight window twice
    print(f"sender killed: receiver got {summary['wire_bytes'] - SIZE} bytes twice")
    assert SIZE <= summary["wire_bytes"] <= SIZE + WINDOW, summary
    with Store(b) as sb:
        assert sb.has(bid)
        sb.get_data(bid, LeaseId.new("t"), verify=True)
        # the received blob is pinned: a GC after `get` exits keeps it
        assert [p.name for p in sb.pins()] == [f"get/{bid}"]
        assert sb.gc().deleted == []


def test_push_needs_accept_push(tmp_path: Path, blob: tuple[Path, BlobId],
                                servers: list[Server]) -> None:
    a, bid = blob
    closed = Server(tmp_path / "c", free_port())
    servers.append(closed)
    refused = subprocess.run(cli(a, "push", str(bid), "--to", closed.ticket),
                             capture_output=True, timeout=60, check=False)
    assert refused.returncode == 1
    assert b"pushes are not accepted" in refused.stderr
    assert b"Traceback" not in refused.stderr
    open_ = Server(tmp_path / "d", free_port(), "--accept-push")
    servers.append(open_)
    pushed = subprocess.run(cli(a, "push", str(bid), "--to", open_.ticket),
                            capture_output=True, timeout=60, check=False)
    assert pushed.returncode == 0, pushed.stderr.decode()
    assert pushed.stdout.decode().startswith(f"pushed {bid}")
    open_.stop()
    with Store(tmp_path / "d") as sd:
        assert sd.has(bid)


MEMBERS = 4000


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, BlobId]:
    """A home holding a collection of MEMBERS small files (4 KiB each)."""
    from blobmesh import collection

    src = tmp_path / "tree"
    src.mkdir()
    for i in range(MEMBERS):
        (src / f"f{i:05}").write_bytes(os.urandom(4096))
    home = tmp_path / "a"
    with Store(home) as store:
        return home, collection.add_tree(store, src).collection_id


def complete_blobs(home: Path) -> int:
    try:
        with sqlite3.connect(f"file:{home / 'store.sqlite'}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT count(*) FROM blobs WHERE complete=1").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def wait_for_members(home: Path, proc: subprocess.Popen[bytes], least: int) -> int:
    deadline = time.monotonic() + 60
    while (n := complete_blobs(home)) < least:
        assert proc.poll() is None, "the get ended before the kill"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return n


def assert_whole_tree(home: Path, cid: BlobId) -> None:
    from blobmesh import collection

    with Store(home) as store:
        members = collection.read_collection(store, cid).members()
        assert len(members) == MEMBERS
        # every member here (one read-only query), and fsck rehashes every present piece:
        # reading each one through a leased reader cost a write transaction per blob
        assert set(store.db.complete_sizes(list(members))) == set(members)
        assert store.fsck().ok


def test_collection_get_with_serve_killed_mid_batch_resumes(
        tmp_path: Path, tree: tuple[Path, BlobId], servers: list[Server]) -> None:
    a, cid = tree
    b = tmp_path / "b"
    port = free_port()
    servers.append(Server(a, port))
    get = start_get_to_interrupt(cli(b, "get", str(cid), "--from", servers[0].ticket))
    wait_for_members(b, get, 500)
    servers[0].kill()
    kept = complete_blobs(b)
    servers.append(Server(a, port))  # back on the same address: the batch resumes
    _, err = get.communicate(timeout=120)
    assert get.returncode == 0, err.decode()
    print(f"serve killed with {kept} of {MEMBERS + 1} blobs stored")
    assert kept < MEMBERS
    assert_whole_tree(b, cid)


def test_collection_get_killed_mid_batch_completes_on_rerun(
        tmp_path: Path, tree: tuple[Path, BlobId], servers: list[Server]) -> None:
    a, cid = tree
    b = tmp_path / "b"
    srv = Server(a, free_port())
    servers.append(srv)
    get = start_get_to_interrupt(cli(b, "get", str(cid), "--from", srv.ticket))
    wait_for_members(b, get, 500)
    get.kill()
    get.wait()
    kept = complete_blobs(b)
    assert kept < MEMBERS
    with Store(b) as store:
        assert store.fsck().ok  # a killed batch leaves whole blobs or none
    done = subprocess.run(cli(b, "get", str(cid), "--from", srv.ticket),
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert_whole_tree(b, cid)
