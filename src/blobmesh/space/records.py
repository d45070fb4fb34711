"""Signed peer records and signed ops: formats, signing and verification (format v1).

Both are ``[body, signature]`` where ``body`` is msgpack and the signature covers a
domain-separation prefix plus the body, so a record can never be replayed as an op or into
another space (the space name is in the body).  Sizes are checked before anything is decoded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import blake3
import msgspec

from blobmesh.errors import InvalidOpError, InvalidRecordError
from blobmesh.hashing.ids import PrefixedId
from blobmesh.space.config import CapValue, Limits
from blobmesh.space.signer import Signer
from blobmesh.transport.identity import NodeId, verify_signature

FORMAT_VERSION = 1
_RECORD_DOMAIN = b"blobmesh/space/record/v1\0"
_OP_DOMAIN = b"blobmesh/space/op/v1\0"
_OP_ID_KEY = blake3.blake3(b"blobmesh/space/op-id/v1").digest()
_KIND_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,63}$")


@dataclass(frozen=True, slots=True, order=True, repr=False)
class OpId(PrefixedId):
    """The content id of an op: keyed BLAKE3 of its signed body; text form ``op1`` + base32."""

    PREFIX: ClassVar[str] = "op1"
    KIND: ClassVar[str] = "op id"


class _Signed(msgspec.Struct, array_like=True, frozen=True):
    body: bytes
    sig: bytes


class _RecordBody(msgspec.Struct, array_like=True, frozen=True):
    v: int
    space: str
    node: bytes
    addresses: list[str]
    groups: list[str]
    caps: dict[str, CapValue]
    created_at: int
    expires_at: int
    tombstone: bool


class _OpBody(msgspec.Struct, array_like=True, frozen=True):
    v: int
    space: str
    author: bytes
    kind: str
    ts: int
    payload: bytes


_enc = msgspec.msgpack.Encoder()
_signed_dec = msgspec.msgpack.Decoder(_Signed)
_record_dec = msgspec.msgpack.Decoder(_RecordBody)
_op_dec = msgspec.msgpack.Decoder(_OpBody)


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """A node's signed self-description.  ``raw`` is the exact signed encoding to relay."""

    node_id: NodeId
    space: str
    addresses: tuple[str, ...]
    groups: frozenset[str]
    capabilities: Mapping[str, CapValue]
    created_at: int  # ms since the epoch, signer's clock
    expires_at: int
    tombstone: bool
    raw: bytes

    def newer_than(self, other: PeerRecord) -> bool:
        """Whether this record replaces ``other`` (same node; later creation wins)."""
        return self.created_at > other.created_at


@dataclass(frozen=True, slots=True)
class Op:
    """An immutable signed op.  ``timestamp`` is ms since the epoch on the author's clock."""

    id: OpId
    author: NodeId
    kind: str
    timestamp: int
    payload: bytes
    raw: bytes


def _check_strings(values: Sequence[str], limit: int, max_len: int, what: str) -> None:
    if len(values) > limit:
        raise InvalidRecordError(f"peer record has {len(values)} {what} (limit {limit})")
    for s in values:
        if not s or len(s) > max_len:
            raise InvalidRecordError(f"peer record has an empty or over-long {what[:-1]}")


def sign_record(signer: Signer, *, space: str, addresses: Sequence[str], groups: Sequence[str],
                capabilities: Mapping[str, CapValue], created_at: int, expires_at: int,
                tombstone: bool = False) -> bytes:
    """Encode and sign a peer record for ``signer``'s node."""
    body = _enc.encode(_RecordBody(
        FORMAT_VERSION, space, signer.node_id.digest, list(addresses), sorted(set(groups)),
        dict(sorted(capabilities.items())), created_at, expires_at, tombstone))
    return _enc.encode(_Signed(body, signer.sign(_RECORD_DOMAIN + body)))


def _split(raw: bytes, max_bytes: int, err: type[InvalidRecordError | InvalidOpError],
           what: str) -> _Signed:
    if len(raw) > max_bytes:
        raise err(f"{what} of {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        return _signed_dec.decode(raw)
    except msgspec.DecodeError as exc:
        raise err(f"malformed {what}: {exc}") from exc


def decode_record(raw: bytes, *, space: str, now_ms: int, limits: Limits) -> PeerRecord:
    """Verify and decode a signed record, raising :class:`InvalidRecordError` with the reason.

    Expired records, records of another space, records dated too far in the future or valid for
    longer than ``limits.max_record_ttl_ms`` are refused, as are bad signatures.
    """
    signed = _split(raw, limits.max_record_bytes, InvalidRecordError, "peer record")
    try:
        b = _record_dec.decode(signed.body)
        node = NodeId(b.node)
    except (msgspec.DecodeError, ValueError) as exc:
        raise InvalidRecordError(f"malformed peer record: {exc}") from exc
    if b.v != FORMAT_VERSION:
        raise InvalidRecordError(f"peer record format {b.v} is not supported")
    if b.space != space:
        raise InvalidRecordError(f"peer record of space {b.space[:64]!r}, not {space!r}")
    _check_strings(b.addresses, limits.max_addresses, limits.max_string, "addresses")
    _check_strings(b.groups, limits.max_groups, limits.max_string, "groups")
    _check_strings(list(b.caps), limits.max_capabilities, limits.max_string, "capabilities")
    if any(isinstance(v, str) and len(v) > limits.max_string for v in b.caps.values()):
        raise InvalidRecordError("peer record has an over-long capability value")
    if not b.created_at < b.expires_at <= b.created_at + limits.max_record_ttl_ms:
        raise InvalidRecordError("peer record validity period is empty or too long")
    if b.expires_at <= now_ms:
        raise InvalidRecordError(f"peer record of {node.short()} has expired")
    if b.created_at > now_ms + limits.max_clock_skew_ms:
        raise InvalidRecordError(f"peer record of {node.short()} is dated in the future")
    if not verify_signature(node, _RECORD_DOMAIN + signed.body, signed.sig):
        raise InvalidRecordError(f"peer record of {node.short()} has a bad signature")
    return PeerRecord(node, b.space, tuple(b.addresses), frozenset(b.groups), b.caps,
                      b.created_at, b.expires_at, b.tombstone, raw)


def peek_record(raw: bytes, limits: Limits) -> tuple[bytes, int] | None:
    """(node id, created_at) of a record, unverified: enough to skip one we hold already."""
    try:
        b = _record_dec.decode(_split(raw, limits.max_record_bytes, InvalidRecordError,
                                      "peer record").body)
    except (InvalidRecordError, msgspec.DecodeError):
        return None
    return b.node, b.created_at


def peek_op_id(raw: bytes, limits: Limits) -> OpId | None:
    """The id an op would have, unverified: enough to skip one we hold already."""
    try:
        return op_id_of(_split(raw, limits.max_op_bytes, InvalidOpError, "op").body)
    except InvalidOpError:
        return None


def check_kind(kind: str) -> None:
    """Raise :class:`InvalidOpError` unless ``kind`` is a well-formed op kind."""
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise InvalidOpError(f"malformed op kind {str(kind)[:70]!r}: lowercase letters, digits "
                             "and . _ / - only, at most 64 characters")


def op_id_of(body: bytes) -> OpId:
    return OpId(blake3.blake3(body, key=_OP_ID_KEY).digest())


def sign_op(signer: Signer, *, space: str, kind: str, timestamp: int, payload: bytes,
            limits: Limits) -> Op:
    """Create a signed op; raises :class:`InvalidOpError` if it would exceed ``max_op_bytes``."""
    check_kind(kind)
    body = _enc.encode(_OpBody(FORMAT_VERSION, space, signer.node_id.digest, kind, timestamp,
                               bytes(payload)))
    raw = _enc.encode(_Signed(body, signer.sign(_OP_DOMAIN + body)))
    if len(raw) > limits.max_op_bytes:
        raise InvalidOpError(f"op of {len(raw)} bytes exceeds the limit of {limits.max_op_bytes}")
    return Op(op_id_of(body), signer.node_id, kind, timestamp, bytes(payload), raw)


def decode_op(raw: bytes, *, space: str, now_ms: int, limits: Limits) -> Op:
    """Verify and decode a signed op, raising :class:`InvalidOpError` with the reason."""
    signed = _split(raw, limits.max_op_bytes, InvalidOpError, "op")
    try:
        b = _op_dec.decode(signed.body)
        author = NodeId(b.author)
    except (msgspec.DecodeError, ValueError) as exc:
        raise InvalidOpError(f"malformed op: {exc}") from exc
    if b.v != FORMAT_VERSION:
        raise InvalidOpError(f"op format {b.v} is not supported")
    if b.space != space:
        raise InvalidOpError(f"op of space {b.space[:64]!r}, not {space!r}")
    check_kind(b.kind)
    if b.ts > now_ms + limits.max_clock_skew_ms:
        raise InvalidOpError("op is dated in the future")
    if not verify_signature(author, _OP_DOMAIN + signed.body, signed.sig):
        raise InvalidOpError(f"op from {author.short()} has a bad signature")
    return Op(op_id_of(signed.body), author, b.kind, b.ts, b.payload, raw)
