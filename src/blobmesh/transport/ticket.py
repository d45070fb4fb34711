"""Tickets: everything needed to reach a node, as one printable string."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, ClassVar

import msgspec

from blobmesh.errors import InvalidIdError
from blobmesh.hashing.ids import DIGEST_SIZE, encode_b32
from blobmesh.transport.identity import NodeId

Address = tuple[str, int]
MAX_ADDRESSES = 16
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?", re.IGNORECASE)


class _TicketV1(msgspec.Struct, array_like=True, frozen=True):
    version: int
    node: Annotated[bytes, msgspec.Meta(min_length=DIGEST_SIZE, max_length=DIGEST_SIZE)]
    addrs: Annotated[list[tuple[str, int]], msgspec.Meta(max_length=MAX_ADDRESSES)]


_decoder = msgspec.msgpack.Decoder(_TicketV1)
_encoder = msgspec.msgpack.Encoder()


def check_address(host: str, port: int) -> Address:
    """Validate a dialable ``(host, port)``; raises :class:`InvalidIdError`."""
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidIdError(f"invalid port {port!r}")
    if not isinstance(host, str) or not host:
        raise InvalidIdError("empty host")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise InvalidIdError(f"invalid host {host[:80]!r}") from None
        return host.lower(), port
    if ip.is_unspecified or ip.is_multicast:
        raise InvalidIdError(f"{host} is not a dialable address")
    return str(ip), port


def parse_address(text: str) -> Address:
    """Parse a dialable ``host:port`` or ``[v6]:port``."""
    return check_address(*_split(text))


def parse_listen_address(text: str) -> Address:
    """Parse a ``host:port`` to listen on: wildcard hosts (``0.0.0.0``, ``::``, empty) and
    port 0 (any free port) are allowed here."""
    host, port = _split(text)
    if not 0 <= port <= 65535:
        raise InvalidIdError(f"invalid port {port}")
    if host in ("", "0.0.0.0", "::"):
        return host or "0.0.0.0", port
    return check_address(host, port or 1)[0], port


def _split(text: str) -> Address:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidIdError(f"expected HOST:PORT, got {text[:80]!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def format_address(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Ticket:
    """A node id plus the addresses it listens on; text form ``bmt1`` + base32(msgpack)."""

    node_id: NodeId
    addrs: tuple[Address, ...]
    PREFIX: ClassVar[str] = "bmt1"

    @classmethod
    def create(cls, node_id: NodeId, addrs: Iterable[Address]) -> Ticket:
        """A validated ticket (duplicates dropped, order kept)."""
        checked = tuple(dict.fromkeys(check_address(h, p) for h, p in addrs))
        if not checked:
            raise InvalidIdError("a ticket needs at least one address")
        if len(checked) > MAX_ADDRESSES:
            raise InvalidIdError(f"a ticket holds at most {MAX_ADDRESSES} addresses")
        return cls(node_id, checked)

    def __str__(self) -> str:
        raw = _encoder.encode(_TicketV1(1, self.node_id.digest, list(self.addrs)))
        return self.PREFIX + encode_b32(raw)

    @classmethod
    def parse(cls, text: str) -> Ticket:
        """Parse and validate a ticket string; raises :class:`InvalidIdError` saying why."""
        if not isinstance(text, str):
            raise InvalidIdError("a ticket must be a string")
        text = text.strip()
        if not text.lower().startswith(cls.PREFIX):
            raise InvalidIdError(f"malformed ticket {text[:40]!r}: must start with "
                                 f"{cls.PREFIX!r}", text=text)
        body = text[len(cls.PREFIX):].lower()
        if len(body) > 4096:
            raise InvalidIdError("malformed ticket: too long", text=text[:80])
        try:
            raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
        except (binascii.Error, ValueError) as exc:
            raise InvalidIdError(f"malformed ticket: not base32 ({exc})", text=text) from exc
        if encode_b32(raw) != body:
            raise InvalidIdError("malformed ticket: non-canonical base32", text=text)
        try:
            t = _decoder.decode(raw)
        except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
            raise InvalidIdError(f"malformed ticket: {exc}", text=text) from exc
        if t.version != 1:
            raise InvalidIdError(f"unsupported ticket version {t.version}", text=text)
        return cls.create(NodeId(t.node), t.addrs)

    def __repr__(self) -> str:
        return f"Ticket({self.node_id.short()}, {', '.join(map(format_address, self.addrs))})"
