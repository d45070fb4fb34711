"""Real servers for the shares tests: nginx serving a share directory, and a misbehaving one."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from blobmesh.hashing import BlobId
from blobmesh.shares import ShareDir, ShareManifest
from blobmesh.store import Store

NGINX = Path("/usr/sbin/nginx")
MiB = 1024 * 1024


def free_port() -> int:
    """A loopback port nothing listens on (closed again: connecting to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def self_signed_cert(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@contextmanager
def run_nginx(root: Path, workdir: Path, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """Run nginx in the foreground serving ``root`` on a free loopback port; yields its URL.

    With ``tls`` (cert, key) it serves HTTPS.
    """
    if not NGINX.exists():
        pytest.skip(f"nginx is not installed at {NGINX} (./dev setup installs it as root)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    w = workdir
    temps = "\n".join(f"    {kind}_temp_path {w}/{kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    ssl = f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};" if tls else ""
    conf = w / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process on;
worker_processes 1;
user root;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {w}/access.log;
{temps}
    types {{ application/json json; }}
    default_type application/octet-stream;
    sendfile on;
    server {{ listen 127.0.0.1:{port}{" ssl" if tls else ""}; root {root}; {ssl} }}
}}
""")
    proc = subprocess.Popen([str(NGINX), "-c", str(conf), "-p", str(w), "-e", str(w / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        limit = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > limit:
                    log = (w / "error.log").read_text() if (w / "error.log").exists() else ""
                    pytest.fail(f"nginx did not start: {log}")
                time.sleep(0.02)
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def share_root(tmp_path: Path) -> Path:
    return tmp_path / "share"


@pytest.fixture
def nginx(share_root: Path, tmp_path: Path) -> Iterator[str]:
    share_root.mkdir(parents=True, exist_ok=True)
    with run_nginx(share_root, tmp_path / "nginx") as url:
        yield url


@pytest.fixture
def dest(tmp_path: Path) -> Iterator[Store]:
    """The store loads go into (the ``store`` fixture is the one blobs are shared from)."""
    with Store(tmp_path / "dest") as s:
        yield s


def shared_blob(store: Store, root: Path, size: int, resource_id: str | None = None
                ) -> tuple[BlobId, bytes]:
    data = os.urandom(size)
    blob_id = store.add_bytes(data).blob_id
    ShareDir(root).share(store, blob_id, resource_id)
    return blob_id, data


class FaultServer:
    """Serves a share directory like a static server, misbehaving as the first path part says.

    ``{url}/MODE/`` is a share base URL; modes: ``ok``, ``404``, ``500``, ``close`` (closes
    mid-body), ``stall`` (half the body, then nothing), ``corrupt`` (one byte flipped),
    ``truncate`` (``Content-Range`` promises the range, half is sent), ``other`` (every
    manifest is ``self.other``), ``norange`` (ignores ``Range``).  Requests are logged.
    """

    def __init__(self, root: Path, other: ShareManifest | None = None) -> None:
        self.root = root
        self.other = other
        self.requests: list[tuple[str, str, str | None]] = []
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}/"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{mode}/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        mode, rel = request.match_info["mode"], request.match_info["path"]
        rng = request.headers.get("Range")
        self.requests.append((mode, rel, rng))
        if mode in ("404", "500"):
            return web.Response(status=int(mode), text="no\n")
        path = self.root / rel
        if not path.is_file():
            return web.Response(status=404)
        data = path.read_bytes()
        if mode == "other" and rel.endswith(".json") and self.other is not None:
            data = self.other.to_json()
        if mode == "corrupt" and rel.endswith("/data"):
            data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + \
                data[len(data) // 2 + 1 :]
        start, end = 0, len(data)
        if rng and mode != "norange":
            first, last = rng.removeprefix("bytes=").split("-")
            start, end = int(first), int(last) + 1
        body = data[start:end]
        resp = web.StreamResponse(status=206 if rng and mode != "norange" else 200)
        if resp.status == 206:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        if mode == "truncate" and rel.endswith("/data"):
            body = body[: len(body) // 2]  # a well-formed response, just short
        resp.content_length = len(body)
        await resp.prepare(request)
        if mode in ("close", "stall") and rel.endswith("/data"):
            await resp.write(body[: len(body) // 2])
            if mode == "stall":
                await self._closing.wait()
            if request.transport is not None:  # None once the client hung up
                request.transport.close()
            return resp
        await resp.write(body)
        await resp.write_eof()
        return resp


@pytest.fixture
async def faults(share_root: Path) -> AsyncIterator[FaultServer]:
    server = FaultServer(share_root)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
