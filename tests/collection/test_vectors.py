"""``docs/collections-vectors.json`` against the implementation and against an independent
transcription of ``docs/collections.md`` (a minimal msgpack writer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from blobmesh.collection import Collection, Dir, Entry, File, Symlink
from blobmesh.errors import InvalidCollectionError
from blobmesh.hashing import BlobId, hash_bytes

VECTORS = json.loads((Path(__file__).parents[2] / "docs" / "collections-vectors.json")
                     .read_text(encoding="utf-8"))


def entry(d: dict[str, Any]) -> Entry:
    if d["kind"] == "file":
        return File(d["path"], d["size"], d["executable"], BlobId.parse(d["blob"]).digest)
    if d["kind"] == "symlink":
        return Symlink(d["path"], d["target"])
    return Dir(d["path"])


def mp_array(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    return (b"\xdc" + n.to_bytes(2, "big")) if n < 1 << 16 else b"\xdd" + n.to_bytes(4, "big")


def mp_str(s: str) -> bytes:
    raw = s.encode()
    n = len(raw)
    if n < 32:
        return bytes([0xA0 | n]) + raw
    return (b"\xd9" + bytes([n]) if n < 256 else b"\xda" + n.to_bytes(2, "big")) + raw


def mp_uint(n: int) -> bytes:
    for limit, head, width in ((1 << 7, b"", 1), (1 << 8, b"\xcc", 1), (1 << 16, b"\xcd", 2),
                               (1 << 32, b"\xce", 4), (1 << 64, b"\xcf", 8)):
        if n < limit:
            return head + n.to_bytes(width, "big")
    raise ValueError(n)


def transcribe(entries: list[dict[str, Any]]) -> bytes:
    """The spec: MAGIC || [1, [entry...]], entry = ["f", path, size, exec, bin32] |
    ["l", path, target] | ["d", path], sorted by path."""
    out: bytes = VECTORS["magic"].encode() + mp_array(2) + mp_uint(1) + mp_array(len(entries))
    for d in sorted(entries, key=lambda d: d["path"].encode()):
        if d["kind"] == "file":
            out += mp_array(5) + mp_str("f") + mp_str(d["path"]) + mp_uint(d["size"])
            out += (b"\xc3" if d["executable"] else b"\xc2")
            out += b"\xc4\x20" + BlobId.parse(d["blob"]).digest
        elif d["kind"] == "symlink":
            out += mp_array(3) + mp_str("l") + mp_str(d["path"]) + mp_str(d["target"])
        else:
            out += mp_array(2) + mp_str("d") + mp_str(d["path"])
    return out


@pytest.mark.parametrize("case", VECTORS["valid"], ids=lambda c: c["name"])
def test_valid_vectors(case: dict[str, Any]) -> None:
    coll = Collection.build(entry(d) for d in case["entries"])
    data = coll.encode()
    assert data.hex() == case["encoding"]
    assert transcribe(case["entries"]) == data
    assert str(hash_bytes(data)) == case["blob_id"]
    assert Collection.decode(bytes.fromhex(case["encoding"])) == coll


@pytest.mark.parametrize("case", VECTORS["invalid"], ids=lambda c: c["name"])
def test_invalid_vectors(case: dict[str, Any]) -> None:
    with pytest.raises(InvalidCollectionError):
        Collection.decode(bytes.fromhex(case["encoding"]))
