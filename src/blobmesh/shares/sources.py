"""Where share directories are read from: ``http://``, ``https://`` and ``file://`` URLs.

A source only fetches bytes; it never decides what to trust (the loader verifies everything).
A new kind of store (S3, say) is one :class:`Source` subclass plus :func:`register_source`.
"""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import aiohttp

from blobmesh.errors import InvalidShareUrlError, ShareSourceError

CHUNK = 4 * 1024 * 1024
# aiohttp pauses the socket once this much is buffered; its 64 KiB default costs throughput
HTTP_READ_BUFSIZE = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """Per-load settings every source honours."""

    stall_timeout: float = 30.0
    """Fail when no byte arrives for this long."""
    connect_timeout: float = 10.0


class Source(ABC):
    """Read access to one share directory; paths are relative to its root."""

    def __init__(self, url: str, options: SourceOptions) -> None:
        self.url = url
        self.options = options

    @abstractmethod
    async def read(self, path: str, limit: int) -> bytes:
        """The whole file at ``path``; :class:`ShareSourceError` if missing or over ``limit``."""

    @abstractmethod
    def read_range(self, path: str, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """Bytes ``[start, end)`` of ``path`` in chunks, exactly that many in total.

        Raises :class:`ShareSourceError` when the source fails or delivers fewer bytes.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional: not every source holds resources
        """Release connections; the source is not used afterwards."""


SourceFactory = Callable[[str, SourceOptions], Source]
_FACTORIES: dict[str, SourceFactory] = {}


def register_source(scheme: str, factory: SourceFactory) -> None:
    """Make ``scheme://`` URLs load through ``factory(url, options)``."""
    _FACTORIES[scheme.lower()] = factory


def open_source(url: str, options: SourceOptions | None = None) -> Source:
    """The source for a share base URL; :class:`InvalidShareUrlError` for unknown schemes."""
    scheme = urlsplit(url).scheme.lower()
    factory = _FACTORIES.get(scheme)
    if factory is None:
        known = ", ".join(sorted(f"{s}://" for s in _FACTORIES))
        raise InvalidShareUrlError(f"unsupported share URL {url!r}: use {known}", url=url)
    return factory(url, options or SourceOptions())


class HttpSource(Source):
    """A share served over HTTP(S); byte ranges use ``Range`` requests."""

    def __init__(self, url: str, options: SourceOptions) -> None:
        super().__init__(url, options)
        if not urlsplit(url).hostname:
            raise InvalidShareUrlError(f"share URL {url!r} has no host", url=url)
        self._base = url.rstrip("/") + "/"
        self._session: aiohttp.ClientSession | None = None

    async def read(self, path: str, limit: int) -> bytes:
        async with self._get(path) as resp:
            _expect_status(resp, path, 200)
            if (resp.content_length or 0) > limit:
                raise ShareSourceError(f"GET {path}: {resp.content_length} bytes, "
                                       f"more than the {limit} expected", path=path)
            data = bytearray()
            async for chunk in resp.content.iter_any():
                data += chunk
                if len(data) > limit:
                    raise ShareSourceError(f"GET {path}: more than the {limit} bytes expected",
                                           path=path)
            return bytes(data)

    async def read_range(self, path: str, start: int, end: int) -> AsyncGenerator[bytes, None]:
        want = f"{start}-{end - 1}"
        async with self._get(path, {"Range": f"bytes={want}"}) as resp:
            if resp.status == 206:
                got = resp.headers.get("Content-Range", "")
                if not got.startswith(f"bytes {want}/"):
                    raise ShareSourceError(f"GET {path}: asked for bytes {want}, "
                                           f"got {got or 'no Content-Range'}", path=path)
                skip = 0
            else:
                # a server without range support sends the whole file from byte 0
                _expect_status(resp, path, 200)
                skip = start
            remaining = end - start
            async for chunk in resp.content.iter_any():
                if skip:
                    dropped = min(skip, len(chunk))
                    skip -= dropped
                    chunk = chunk[dropped:]
                piece = chunk[:remaining]
                remaining -= len(piece)
                if piece:
                    yield piece
                if not remaining:
                    return
            raise ShareSourceError(f"GET {path}: body ended {remaining} bytes short",
                                   path=path)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @asynccontextmanager
    async def _get(self, path: str, headers: dict[str, str] | None = None
                   ) -> AsyncIterator[aiohttp.ClientResponse]:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.options.connect_timeout,
                                            sock_read=self.options.stall_timeout)
            self._session = aiohttp.ClientSession(
                timeout=timeout, auto_decompress=False, read_bufsize=HTTP_READ_BUFSIZE,
                headers={"Accept-Encoding": "identity"})
        try:
            async with self._session.get(self._base + path, headers=headers) as resp:
                yield resp
        except TimeoutError as exc:  # aiohttp's read and connect timeouts included
            raise ShareSourceError(f"GET {path}: timed out (stalled for "
                                   f"{self.options.stall_timeout:g} s or connect timeout)",
                                   path=path) from exc
        except aiohttp.ClientConnectorError as exc:
            raise ShareSourceError(f"cannot connect: {exc.os_error.strerror or exc}",
                                   path=path) from exc
        except aiohttp.ClientError as exc:
            raise ShareSourceError(f"GET {path}: {type(exc).__name__}: {exc}",
                                   path=path) from exc


def _expect_status(resp: aiohttp.ClientResponse, path: str, status: int) -> None:
    if resp.status != status:
        raise ShareSourceError(f"GET {path}: HTTP {resp.status} {resp.reason or ''}".rstrip(),
                               path=path, status=resp.status)


class FileSource(Source):
    """A share directory on a local (or mounted) file system: ``file:///srv/share``."""

    def __init__(self, url: str, options: SourceOptions) -> None:
        super().__init__(url, options)
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InvalidShareUrlError(f"file URL {url!r} names a host; use file:///path",
                                       url=url)
        self._root = Path(unquote(parts.path))

    async def read(self, path: str, limit: int) -> bytes:
        return await asyncio.to_thread(self._read, path, limit)

    def _read(self, path: str, limit: int) -> bytes:
        with self._os_errors(path), self._open(path) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ShareSourceError(f"{path}: more than the {limit} bytes expected", path=path)
        return data

    async def read_range(self, path: str, start: int, end: int) -> AsyncGenerator[bytes, None]:
        f = await asyncio.to_thread(self._open, path)
        try:
            offset = start
            while offset < end:
                with self._os_errors(path):
                    chunk = await asyncio.to_thread(os.pread, f.fileno(),
                                                    min(CHUNK, end - offset), offset)
                if not chunk:
                    raise ShareSourceError(f"{path}: file ends {end - offset} bytes short",
                                           path=path)
                offset += len(chunk)
                yield chunk
        finally:
            f.close()

    def _open(self, path: str) -> BinaryIO:
        with self._os_errors(path):
            return open(self._root / path, "rb")

    @contextmanager
    def _os_errors(self, path: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise ShareSourceError(f"{self._root / path}: {exc.strerror or exc}",
                                   path=path) from exc


register_source("http", HttpSource)
register_source("https", HttpSource)
register_source("file", FileSource)
