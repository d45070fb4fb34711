"""``blobmesh dashboard`` and ``blobmesh top`` (driven in tmux) against real node processes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobmesh.dashboard import read_url_file
from blobmesh.node.fleet import Fleet
from blobmesh.store import Store

pytestmark = pytest.mark.slow
MiB = 1024 * 1024


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blobmesh.cli.main", "--home", str(home),
                           *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DISPLAY": ""})


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path) as f:
        f.add(extra=["--http-listen", "127.0.0.1:0"])
        f.add()
        f.start()
        asyncio.run(f.wait_converged(20))
        yield f


def test_dashboard_prints_the_url_without_a_browser(fleet: Fleet, tmp_path: Path) -> None:
    src, plain = fleet.nodes
    info = read_url_file(src.home)
    assert info is not None
    out = cli(src.home, "dashboard")
    assert out.returncode == 0 and out.stdout.strip() == info["url"]
    out = cli(plain.home, "dashboard")
    assert out.returncode == 2 and "--http-listen" in out.stderr
    out = cli(tmp_path / "nobody", "dashboard")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "no node" in out.stderr


@pytest.mark.skipif(not shutil.which("tmux"), reason="needs tmux")
def test_top_shows_a_distribution_completing_and_q_quits(fleet: Fleet) -> None:
    src, other = fleet.nodes
    tmux = ["tmux", "-L", f"bmdash-{uuid.uuid4().hex[:8]}"]
    cmd = f"{sys.executable} -m blobmesh.cli.main --home {src.home} top --interval 0.5"
    # the pane's size, not an inherited COLUMNS, is the screen
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    subprocess.run([*tmux, "new-session", "-d", "-x", "170", "-y", "45", cmd], check=True,
                   env=env)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True,
                              text=True).stdout

    def wait_screen(what: str, within: float) -> str:
        end = time.monotonic() + within
        while time.monotonic() < end:
            text = screen()
            if what in text:
                return text
            time.sleep(0.2)
        raise AssertionError(f"top never showed {what!r}; screen:\n{screen()}")

    def member_row(node: str, what: str, within: float) -> str:
        end = time.monotonic() + within
        while True:
            row = next((ln for ln in screen().splitlines() if node[:16] in ln), "")
            if what in row:
                return row
            assert time.monotonic() < end, f"no {what!r} in {node[:16]}'s row:\n{screen()}"
            time.sleep(0.2)

    try:
        wait_screen("fleet: 2 members", 15)
        member_row(other.node_id, "0 B (0)", 15)  # the other member's store, as it answers
        with Store(src.home) as store:
            blob = store.add_bytes(os.urandom(32 * MiB)).blob_id
        out = cli(src.home, "distribute", str(blob), "--to", "all")
        assert out.returncode == 0, out.stderr
        handle = out.stdout.split()[1]
        end = time.monotonic() + 40
        while True:
            row = next((ln for ln in screen().splitlines() if handle in ln), "")
            if "completed" in row and "100.0%" in row and "1/1" in row:
                break
            assert time.monotonic() < end, f"no completed row for {handle}:\n{screen()}"
            time.sleep(0.2)
        member_row(other.node_id, "32.0 MiB (1)", 15)  # what it received
        subprocess.run([*tmux, "send-keys", "q"], check=True)
        end = time.monotonic() + 10
        while subprocess.run([*tmux, "has-session"], capture_output=True).returncode == 0:
            assert time.monotonic() < end, "q did not quit top"
            time.sleep(0.1)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_http_listen_on_a_taken_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "blobmesh.cli.main", "--home", str(tmp_path / "h"), "node",
             "run", "--http-listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    last = out.stderr.splitlines()[-1]
    assert last.startswith(f"blobmesh: error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in out.stderr


def test_dashboard_url_carries_the_token_unless_loopback(tmp_path: Path) -> None:
    from blobmesh.cli.dashboard_cmds import dashboard_url

    for url, with_token in (("http://10.1.2.3:8080/", True), ("http://127.0.0.1:8080/", False),
                            ("http://[::1]:8080/", False)):
        (tmp_path / "dashboard.json").write_text(json.dumps({"url": url, "token": "T" * 20}))
        assert dashboard_url(tmp_path) == (f"{url}?token={'T' * 20}" if with_token else url)
