"""Tickets: everything needed to reach a node (and join its space), as one printable string."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Annotated, ClassVar

import msgspec

from blobmesh.errors import InvalidIdError
from blobmesh.hashing.ids import DIGEST_SIZE, encode_b32
from blobmesh.transport.identity import NodeId

Address = tuple[str, int]
MAX_ADDRESSES = 16
MAX_SECRET = 256
MAX_SPACE_NAME = 256
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?", re.IGNORECASE)


class _TicketV1(msgspec.Struct, array_like=True, frozen=True):
    version: int
    node: Annotated[bytes, msgspec.Meta(min_length=DIGEST_SIZE, max_length=DIGEST_SIZE)]
    addrs: Annotated[list[tuple[str, int]], msgspec.Meta(max_length=MAX_ADDRESSES)]


class _TicketV2(msgspec.Struct, array_like=True, frozen=True):
    version: int
    node: Annotated[bytes, msgspec.Meta(min_length=DIGEST_SIZE, max_length=DIGEST_SIZE)]
    addrs: Annotated[list[tuple[str, int]], msgspec.Meta(max_length=MAX_ADDRESSES)]
    space: Annotated[str, msgspec.Meta(max_length=MAX_SPACE_NAME)]
    secret: Annotated[bytes, msgspec.Meta(max_length=MAX_SECRET)] | None


class _Version(msgspec.Struct, array_like=True, frozen=True):
    version: int


_version_decoder = msgspec.msgpack.Decoder(_Version)
_decoders: dict[int, msgspec.msgpack.Decoder[_TicketV1] | msgspec.msgpack.Decoder[_TicketV2]] = {
    1: msgspec.msgpack.Decoder(_TicketV1), 2: msgspec.msgpack.Decoder(_TicketV2)}
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
    """A node id plus the addresses it listens on; text form ``bmt1`` + base32(msgpack).

    A node's join ticket also names its space and carries the space's secret (version 2), so
    whoever holds the ticket can join and nobody else can: treat it like a password.
    """

    node_id: NodeId
    addrs: tuple[Address, ...]
    space: str | None = None
    secret: bytes | None = field(default=None, repr=False)
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

    def for_space(self, space: str, secret: bytes | None) -> Ticket:
        """This ticket as a join ticket of ``space`` (open if ``secret`` is None)."""
        if len(space) > MAX_SPACE_NAME or (secret is not None and len(secret) > MAX_SECRET):
            raise InvalidIdError("space name or secret too long for a ticket")
        return replace(self, space=space, secret=secret)

    def __str__(self) -> str:
        if self.space is None:
            raw = _encoder.encode(_TicketV1(1, self.node_id.digest, list(self.addrs)))
        else:
            raw = _encoder.encode(_TicketV2(2, self.node_id.digest, list(self.addrs),
                                            self.space, self.secret))
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
            version = _version_decoder.decode(raw).version
            decoder = _decoders.get(version)
            if decoder is None:
                raise InvalidIdError(f"unsupported ticket version {version}", text=text)
            t = decoder.decode(raw)
        except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
            raise InvalidIdError(f"malformed ticket: {exc}", text=text) from exc
        ticket = cls.create(NodeId(t.node), t.addrs)
        return ticket.for_space(t.space, t.secret) if isinstance(t, _TicketV2) else ticket

    def __repr__(self) -> str:
        space = f", space {self.space}" + (" (closed)" if self.secret else " (open)") \
            if self.space is not None else ""
        return (f"Ticket({self.node_id.short()}, "
                f"{', '.join(map(format_address, self.addrs))}{space})")
