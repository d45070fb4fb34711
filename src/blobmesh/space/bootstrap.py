"""The optional bootstrap server and its client (HTTP, aiohttp).

``PUT /v1/spaces/{space}/records`` with a signed peer record as the body stores it (verified,
replacing an older record of the same node, kept until it expires); ``GET
/v1/spaces/{space}/records?limit=N`` returns a random sample of unexpired records as a msgpack
array of signed records.  The server holds at most ``max_records`` per space and ``max_spaces``
spaces; it needs no trust: every record is self-signed and verified again by each node.
"""

from __future__ import annotations

import random
import time
import urllib.parse
from collections.abc import Callable

import aiohttp
import msgspec
from aiohttp import web

from blobmesh.errors import BootstrapError, InvalidRecordError
from blobmesh.space.config import Limits
from blobmesh.space.metrics import Metrics
from blobmesh.space.records import PeerRecord, decode_record
from blobmesh.transport.identity import NodeId

MAX_SAMPLE = 64
_list_dec = msgspec.msgpack.Decoder(list[bytes])
_enc = msgspec.msgpack.Encoder()


class BootstrapServer:
    """In-memory, bounded record exchange for any number of spaces."""

    def __init__(self, *, limits: Limits | None = None, max_records: int = 10_000,
                 max_spaces: int = 1000, clock: Callable[[], float] = time.time) -> None:
        self.limits = limits or Limits()
        self.max_records = max_records
        self.max_spaces = max_spaces
        self.metrics = Metrics()
        self._clock = clock
        self._spaces: dict[str, dict[NodeId, PeerRecord]] = {}
        self._rng = random.Random()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_record_bytes)
        app.router.add_put("/v1/spaces/{space}/records", self._put)
        app.router.add_get("/v1/spaces/{space}/records", self._get)
        return app

    def _expire(self, records: dict[NodeId, PeerRecord], now_ms: int) -> None:
        for n in [n for n, r in records.items() if r.expires_at <= now_ms]:
            del records[n]

    def put(self, space: str, raw: bytes) -> None:
        """Verify and store ``raw``; raises InvalidRecordError or BootstrapError when full."""
        now = int(self._clock() * 1000)
        rec = decode_record(raw, space=space, now_ms=now, limits=self.limits)
        records = self._spaces.get(space)
        if records is None:
            if len(self._spaces) >= self.max_spaces:
                for name in [s for s, rs in self._spaces.items() if not rs]:
                    del self._spaces[name]
            if len(self._spaces) >= self.max_spaces:
                self.metrics.limit("bootstrap_spaces")
                raise BootstrapError("bootstrap server holds too many spaces")
            records = self._spaces[space] = {}
        old = records.get(rec.node_id)
        if old is not None and not rec.newer_than(old):
            return
        if old is None and len(records) >= self.max_records:
            self._expire(records, now)
            if len(records) >= self.max_records:
                self.metrics.limit("bootstrap_records")
                raise BootstrapError("bootstrap server holds too many records for this space")
        records[rec.node_id] = rec

    def sample(self, space: str, limit: int) -> list[bytes]:
        records = self._spaces.get(space, {})
        self._expire(records, int(self._clock() * 1000))
        chosen = self._rng.sample(list(records.values()), min(limit, MAX_SAMPLE, len(records)))
        return [r.raw for r in chosen]

    async def _put(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            self.put(request.match_info["space"], raw)
        except InvalidRecordError as exc:
            self.metrics.inc("records_rejected")
            return web.Response(status=400, text=str(exc))
        except BootstrapError as exc:
            return web.Response(status=503, text=str(exc))
        return web.Response(status=204)

    async def _get(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "32"))
        except ValueError:
            return web.Response(status=400, text="limit must be an integer")
        body = _enc.encode(self.sample(request.match_info["space"], max(0, limit)))
        return web.Response(body=body, content_type="application/msgpack")


async def serve_bootstrap(server: BootstrapServer, host: str, port: int) -> web.AppRunner:
    """Start serving on ``host:port``; stop with ``await runner.cleanup()``."""
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


class BootstrapClient:
    """Talks to one bootstrap server; every failure is a :class:`BootstrapError`."""

    def __init__(self, url: str, limits: Limits, timeout: float = 5.0) -> None:
        self._url = url.rstrip("/")
        self._limits = limits
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def _records_url(self, space: str) -> str:
        return f"{self._url}/v1/spaces/{urllib.parse.quote(space, safe='')}/records"

    async def put(self, space: str, raw: bytes) -> None:
        """Store our signed record."""
        try:
            async with aiohttp.ClientSession(timeout=self._timeout) as http, \
                    http.put(self._records_url(space), data=raw) as resp:
                if resp.status >= 300:
                    text = (await resp.content.read(300)).decode(errors="replace")
                    raise BootstrapError(f"bootstrap server {self._url} said {resp.status}: "
                                         f"{text}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BootstrapError(f"bootstrap server {self._url} unreachable: {exc}") from exc

    async def sample(self, space: str, limit: int = 32) -> list[bytes]:
        """A random sample of signed records (unverified: the caller verifies each)."""
        cap = self._limits.max_message_bytes
        try:
            async with aiohttp.ClientSession(timeout=self._timeout) as http, \
                    http.get(self._records_url(space), params={"limit": str(limit)}) as resp:
                if resp.status != 200:
                    raise BootstrapError(f"bootstrap server {self._url} said {resp.status}")
                body = await resp.content.read(cap + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BootstrapError(f"bootstrap server {self._url} unreachable: {exc}") from exc
        if len(body) > cap:
            raise BootstrapError(f"bootstrap server {self._url} sent more than {cap} bytes")
        try:
            records = _list_dec.decode(body)
        except msgspec.DecodeError as exc:
            raise BootstrapError(f"bootstrap server {self._url} sent garbage: {exc}") from exc
        return records[: self._limits.max_elements]

