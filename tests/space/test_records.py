from __future__ import annotations

import dataclasses

import msgspec
import pytest

from blobmesh.errors import InvalidOpError, InvalidRecordError
from blobmesh.space import Limits
from blobmesh.space.records import decode_op, decode_record, sign_op, sign_record
from blobmesh.transport.identity import Identity

LIM = Limits()
NOW = 1_700_000_000_000


def record(ident: Identity, *, created: int = NOW, ttl: int = 60_000, space: str = "s",
           **kw: object) -> bytes:
    args: dict[str, object] = {"addresses": ["127.0.0.1:1"], "groups": ["edge"],
                               "capabilities": {"gpu": True, "mem_gb": 64, "arch": "arm64"}}
    args.update(kw)
    return sign_record(ident, space=space, created_at=created, expires_at=created + ttl,
                       **args)  # type: ignore[arg-type]


def test_round_trip_keeps_typed_capabilities() -> None:
    ident = Identity.generate()
    rec = decode_record(record(ident), space="s", now_ms=NOW, limits=LIM)
    assert rec.node_id == ident.node_id
    assert rec.capabilities == {"arch": "arm64", "gpu": True, "mem_gb": 64}
    assert rec.groups == {"edge"} and not rec.tombstone


def test_forged_record_is_rejected() -> None:
    a, b = Identity.generate(), Identity.generate()
    body, _sig = msgspec.msgpack.decode(record(a))
    forged = msgspec.msgpack.encode([body, b.sign(b"blobmesh/space/record/v1\0" + body)])
    with pytest.raises(InvalidRecordError, match="bad signature"):
        decode_record(forged, space="s", now_ms=NOW, limits=LIM)
    tampered = record(a).replace(b"arm64", b"amd64")
    with pytest.raises(InvalidRecordError, match="bad signature"):
        decode_record(tampered, space="s", now_ms=NOW, limits=LIM)


@pytest.mark.parametrize(("raw_kw", "now", "reason"), [
    ({}, NOW + 60_000, "expired"),
    ({"space": "other"}, NOW, "space"),
    ({"created": NOW + 10 * 60_000}, NOW, "future"),
    ({"ttl": 30 * 24 * 3600 * 1000}, NOW, "too long"),
    ({"groups": [f"g{i}" for i in range(100)]}, NOW, "groups"),
])
def test_invalid_records(raw_kw: dict[str, object], now: int, reason: str) -> None:
    raw = record(Identity.generate(), **raw_kw)  # type: ignore[arg-type]
    with pytest.raises(InvalidRecordError, match=reason):
        decode_record(raw, space="s", now_ms=now, limits=LIM)


def test_oversized_record_rejected_before_decoding() -> None:
    with pytest.raises(InvalidRecordError, match="exceeds"):
        decode_record(b"\xff" * (LIM.max_record_bytes + 1), space="s", now_ms=NOW, limits=LIM)


def test_newer_replaces_older_only() -> None:
    ident = Identity.generate()
    old = decode_record(record(ident), space="s", now_ms=NOW, limits=LIM)
    new = decode_record(record(ident, created=NOW + 1), space="s", now_ms=NOW, limits=LIM)
    assert new.newer_than(old) and not old.newer_than(new) and not old.newer_than(old)


def test_ops_are_content_addressed_and_verified() -> None:
    ident = Identity.generate()
    op = sign_op(ident, space="s", kind="dist.request", timestamp=NOW, payload=b"x", limits=LIM)
    again = decode_op(op.raw, space="s", now_ms=NOW, limits=LIM)
    assert again == op and str(op.id).startswith("op1")
    with pytest.raises(InvalidOpError, match="space"):
        decode_op(op.raw, space="t", now_ms=NOW, limits=LIM)
    with pytest.raises(InvalidOpError, match="signature"):
        decode_op(op.raw.replace(b"dist.request", b"dist.reqvest"), space="s", now_ms=NOW,
                  limits=LIM)
    with pytest.raises(InvalidOpError, match="kind"):
        sign_op(ident, space="s", kind="Bad Kind", timestamp=NOW, payload=b"", limits=LIM)
    small = dataclasses.replace(LIM, max_op_bytes=200)
    with pytest.raises(InvalidOpError, match="exceeds"):
        sign_op(ident, space="s", kind="k", timestamp=NOW, payload=b"x" * 300, limits=small)
    with pytest.raises(InvalidOpError, match="exceeds"):
        decode_op(b"\x00" * 201, space="s", now_ms=NOW, limits=small)
