"""The v1 test vectors of docs/hashing.md, checked against the code and the spec's text."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import blake3
import pytest

from blobmesh.hashing import BlobId, choose_piece_size, hash_bytes, hash_stream
from blobmesh.hashing.tree import LEAF_KEY, PARENT_KEY, ROOT_KEY, top_from_proof

DOCS = Path(__file__).resolve().parents[2] / "docs"
VECTORS: dict[str, Any] = json.loads((DOCS / "hashing-vectors.json").read_text())


def generate(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


# --- an independent transcription of docs/hashing.md (recursive, no shared helpers) ----------

def _key(purpose: str) -> bytes:
    out: bytes = blake3.blake3(
        b"", derive_key_context=f"blobmesh 2026-11 hash tree v1 {purpose}").digest()
    return out


def _b3(key: bytes, data: bytes) -> bytes:
    out: bytes = blake3.blake3(data, key=key).digest()
    return out


def _top(hashes: list[bytes]) -> bytes:
    if len(hashes) == 1:
        return hashes[0]
    s = 1
    while s * 2 < len(hashes):
        s *= 2
    return _b3(_key("parent"), _top(hashes[:s]) + _top(hashes[s:]))


def _leaves(data: bytes) -> list[bytes]:
    chunks = [data[i : i + 16384] for i in range(0, len(data), 16384)] or [b""]
    return [_b3(_key("leaf"), c) for c in chunks]


def reference_id(data: bytes) -> bytes:
    return _b3(_key("root"), len(data).to_bytes(8, "little") + _top(_leaves(data)))


def reference_layer(data: bytes, piece_size: int) -> list[bytes]:
    pieces = [data[i : i + piece_size] for i in range(0, len(data), piece_size)] or [b""]
    return [_top(_leaves(p)) for p in pieces]


# --- tests --------------------------------------------------------------------------------------

def test_version_and_keys() -> None:
    assert VECTORS["version"] == "v1"
    keys = VECTORS["keys"]
    assert (LEAF_KEY.hex(), PARENT_KEY.hex(), ROOT_KEY.hex()) == \
        (keys["leaf"], keys["parent"], keys["root"])
    assert [_key(k).hex() for k in ("leaf", "parent", "root")] == \
        [keys["leaf"], keys["parent"], keys["root"]]


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: f"n={v['size']}")
def test_vector(vector: dict[str, Any]) -> None:
    data = generate(vector["size"])
    expected = BlobId.parse(vector["blob_id"])
    assert hash_bytes(data) == expected
    assert reference_id(data) == expected.digest
    assert choose_piece_size(len(data)) == vector["default_piece_size"]
    assert vector["piece_layers"], "every vector carries at least one piece layer"
    for entry in vector["piece_layers"]:
        hashes = [bytes.fromhex(h) for h in entry["hashes"]]
        blob_id, layer = hash_stream([data], entry["piece_size"])
        assert blob_id == expected
        assert list(layer.hashes) == hashes == reference_layer(data, entry["piece_size"])
        if "proof" in entry:
            index, siblings = entry["proof"]["index"], entry["proof"]["siblings"]
            assert [s.hex() for s in layer.proof(index)] == siblings
            top = top_from_proof(len(hashes), index, hashes[index],
                                 [bytes.fromhex(s) for s in siblings])
            assert reference_id(data) == _b3(ROOT_KEY, len(data).to_bytes(8, "little") + top)


def test_proofs_are_covered() -> None:
    assert sum("proof" in e for v in VECTORS["vectors"] for e in v["piece_layers"]) >= 2


def test_doc_table_matches_vectors() -> None:
    ids = {v["size"]: v["blob_id"] for v in VECTORS["vectors"]}
    rows = re.findall(r"^\| (\d+)\s+\| `(bm1[a-z2-7]+)` \|$",
                      (DOCS / "hashing.md").read_text(), re.MULTILINE)
    assert len(rows) >= 5
    for size, blob_id in rows:
        assert ids[int(size)] == blob_id
