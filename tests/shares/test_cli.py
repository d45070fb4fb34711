"""``blobmesh share / unshare / load`` as a user runs them: one-line errors and exit codes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

from blobmesh.shares import ShareDir
from blobmesh.store import LeaseId, Store
from tests.shares.conftest import FaultServer, MiB, run_nginx, self_signed_cert

BLOBMESH = Path(sys.executable).parent / "blobmesh"


def run(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BLOBMESH), "--home", str(home), *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "BLOBMESH_DEBUG": "", **env})


def test_share_load_unshare(tmp_path: Path, share_root: Path, nginx: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = os.urandom(2 * MiB)
    with Store(src) as store:
        blob_id = str(store.add_bytes(data).blob_id)

    done = run(src, "share", blob_id, "--dir", str(share_root), "--resource", "app-v1")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"shared {blob_id} as app-v1 in {share_root}\n"
    assert "already shared" in run(src, "share", blob_id, "--dir", str(share_root)).stdout

    done = run(dst, "load", "app-v1", "--url", nginx, "--tries", "1", "--deadline", "30", "-q")
    assert (done.returncode, done.stdout) == (0, f"{blob_id}\n"), done.stderr
    with Store(dst) as store:
        assert store.get_data(store.blobs()[0].blob_id, LeaseId.new("test")) == data

    done = run(src, "unshare", "app-v1", "--dir", str(share_root))
    assert done.returncode == 0 and f"blobs/{blob_id}" in done.stdout
    done = run(tmp_path / "other", "load", blob_id, "--url", nginx, "--url", nginx,
               "--tries", "1")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"blobmesh: error: could not load {blob_id} from 2 share URL")
    assert "HTTP 404" in done.stderr and "(try 1)" in done.stderr


def test_bad_input_gives_exit_2(tmp_path: Path) -> None:
    done = run(tmp_path, "load", "../etc/passwd", "--url", "http://127.0.0.1:1/")
    assert done.returncode == 2
    assert done.stderr.startswith("blobmesh: error: invalid resource id '../etc/passwd'")
    done = run(tmp_path, "load", "thing", "--url", "gopher://x/")
    assert done.returncode == 2 and "unsupported share URL" in done.stderr
    done = run(tmp_path, "unshare", "thing", "--dir", str(tmp_path / "none"))
    assert done.returncode == 1
    assert done.stderr == f"blobmesh: error: no share directory at {tmp_path / 'none'}\n"
    assert not (tmp_path / "none").exists()


def test_load_over_https(tmp_path: Path, share_root: Path) -> None:
    with Store(tmp_path / "src") as store:
        blob_id = store.add_bytes(os.urandom(300_000)).blob_id
        ShareDir(share_root).share(store, blob_id)
    cert, key = self_signed_cert(tmp_path)
    with run_nginx(share_root, tmp_path / "nginx", tls=(cert, key)) as url:
        untrusted = run(tmp_path / "a", "load", str(blob_id), "--url", url, "--tries", "1")
        assert untrusted.returncode == 1 and "certificate verify failed" in untrusted.stderr
        done = run(tmp_path / "b", "load", str(blob_id), "--url", url, "-q",
                   SSL_CERT_FILE=str(cert))
    assert (done.returncode, done.stdout) == (0, f"{blob_id}\n"), done.stderr


async def test_deadline_then_resume_in_a_new_process(tmp_path: Path, share_root: Path,
                                                     faults: FaultServer) -> None:
    with Store(tmp_path / "src") as store:
        blob_id = store.add_bytes(os.urandom(4 * MiB)).blob_id
        ShareDir(share_root).share(store, blob_id)

    async def load(mode: str, *extra: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            str(BLOBMESH), "--home", str(tmp_path / "dst"), "load", str(blob_id),
            "--url", faults.url(mode), *extra, stdout=PIPE, stderr=PIPE)
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await load("stall", "--deadline", "1")
    assert (code, out) == (1, "")
    assert err.startswith(f"blobmesh: error: deadline passed loading {blob_id}; "
                          "8/16 pieces kept for a resume")
    assert await load("ok", "-q") == (0, f"{blob_id}\n", "")
    assert [r for m, p, r in faults.requests if p.endswith("/data")] == \
        ["bytes=0-4194303", "bytes=2097152-4194303"]
