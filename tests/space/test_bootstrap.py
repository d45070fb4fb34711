from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from blobmesh.errors import BootstrapError
from blobmesh.space import Limits
from blobmesh.space.bootstrap import BootstrapClient, BootstrapServer, serve_bootstrap
from blobmesh.space.records import sign_record
from blobmesh.transport.identity import Identity
from tests.space.util import cluster, config, full_view
from tests.util import eventually


def rec(ident: Identity, space: str = "default", created: int | None = None) -> bytes:
    now = created or int(time.time() * 1000)
    return sign_record(ident, space=space, addresses=[], groups=[], capabilities={},
                       created_at=now, expires_at=now + 60_000)


async def serve(app_or_server: BootstrapServer | web.Application) -> tuple[web.AppRunner, str]:
    if isinstance(app_or_server, BootstrapServer):
        runner = await serve_bootstrap(app_or_server, "127.0.0.1", 0)
    else:
        runner = web.AppRunner(app_or_server)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@pytest.fixture
async def server() -> AsyncIterator[tuple[BootstrapServer, str]]:
    srv = BootstrapServer(max_records=3)
    runner, url = await serve(srv)
    yield srv, url
    await runner.cleanup()


async def test_put_and_sample(server: tuple[BootstrapServer, str]) -> None:
    srv, url = server
    client = BootstrapClient(url, Limits())
    idents = [Identity.generate() for _ in range(3)]
    for i in idents:
        await client.put("default", rec(i))
    await client.put("default", rec(idents[0], created=int(time.time() * 1000) - 5000))
    got = await client.sample("default", limit=2)
    assert len(got) == 2 and set(got) <= {rec_ for rec_ in srv.sample("default", 10)}
    assert await client.sample("elsewhere") == []
    with pytest.raises(BootstrapError, match="503"):
        await client.put("default", rec(Identity.generate()))  # full
    assert srv.metrics["limit_bootstrap_records"] == 1


async def test_invalid_records_are_refused(server: tuple[BootstrapServer, str]) -> None:
    srv, url = server
    client = BootstrapClient(url, Limits())
    with pytest.raises(BootstrapError, match=r"400.*space"):
        await client.put("default", rec(Identity.generate(), space="other"))
    with pytest.raises(BootstrapError, match="400"):
        await client.put("default", rec(Identity.generate())[:-3] + b"abc")
    with pytest.raises(BootstrapError, match=r"413|400"):
        await client.put("default", b"x" * 10_000)
    assert srv.sample("default", 10) == []


async def test_records_expire_on_the_server() -> None:
    now = [time.time()]
    srv = BootstrapServer(clock=lambda: now[0])
    srv.put("default", rec(Identity.generate()))
    assert len(srv.sample("default", 10)) == 1
    now[0] += 120
    assert srv.sample("default", 10) == []


async def test_down_or_garbage_server_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(BootstrapError, match="unreachable"):
        await BootstrapClient(dead, Limits(), timeout=2).sample("default")

    async def garbage(_: web.Request) -> web.Response:
        return web.Response(body=b"\xc1\xc1 not msgpack")

    app = web.Application()
    app.router.add_get("/v1/spaces/{space}/records", garbage)
    runner, url = await serve(app)
    try:
        with pytest.raises(BootstrapError, match="garbage"):
            await BootstrapClient(url, Limits()).sample("default")
    finally:
        await runner.cleanup()


async def test_nodes_find_each_other_through_the_server(
        server: tuple[BootstrapServer, str], tmp_path: Path) -> None:
    _, url = server
    async with cluster(tmp_path) as c:
        for _ in range(3):
            await c.add(config(bootstrap_urls=(url,)))  # no seeds at all
        await eventually(lambda: full_view(c), within=5)
