"""``push --json`` against a real ``serve --accept-push`` process: its schema."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blobmesh.store import Store
from tests.cli import schemas

pytestmark = pytest.mark.slow


def cli(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "blobmesh.cli.main", "--home", str(home), *args]


def test_push_json(tmp_path: Path) -> None:
    src, dst = tmp_path / "a", tmp_path / "b"
    data = os.urandom(300_000)
    with Store(src) as store:
        blob = store.add_bytes(data).blob_id
    with open(tmp_path / "serve.log", "wb") as log:
        serve = subprocess.Popen(cli(dst, "serve", "--listen", "127.0.0.1:0", "--accept-push"),
                                 stdout=subprocess.PIPE, stderr=log)
    try:
        assert serve.stdout is not None
        ticket = serve.stdout.readline().decode().strip()
        assert ticket.startswith("bmt1"), (tmp_path / "serve.log").read_text()
        r = subprocess.run(cli(src, "push", str(blob)[:10], "--to", ticket, "--json"),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        pushed = schemas.check(json.loads(r.stdout), schemas.Transferred)
        assert (pushed.blob, pushed.total, pushed.output) == (str(blob), len(data), None)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(15)
        if serve.stdout is not None:
            serve.stdout.close()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
    with Store(dst) as store:
        assert store.has(blob)
