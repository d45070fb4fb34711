"""The batch protocol's messages (against the spec's vectors) and the receiver's core."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from blobmesh.errors import ProtocolError
from blobmesh.hashing import BlobId, hash_bytes
from blobmesh.transfer import batch
from blobmesh.transfer.batch import MAX_BLOB, MAX_IDS, BatchPull, Blob, Skip, Want
from blobmesh.transfer.messages import Error

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[2] / "docs" / "transfer-batch-vectors.json").read_text())


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@pytest.mark.parametrize("vector", VECTORS["messages"], ids=lambda v: v["name"])
def test_vectors(vector: dict[str, Any]) -> None:
    assert VECTORS["protocol"] == batch.BATCH_PROTOCOL
    raw = bytes.fromhex(vector["msgpack_hex"])
    msg = batch.decode(raw)
    fields = {k: _plain(v) for k, v in msgspec.structs.asdict(msg).items()}
    assert fields == vector["fields"]
    assert batch.encode(msg) == raw


def ids(n: int) -> list[BlobId]:
    return [BlobId(os.urandom(32)) for _ in range(n)]


def answer_all(core: BatchPull, want: Want, data: bytes = b"x") -> list[batch.BatchStep]:
    return [core.receive(Blob(want.batch, i, memoryview(data))) for i in range(len(want.ids))]


def test_keeps_two_wants_in_flight_and_commits_in_batches() -> None:
    wanted = ids(600)
    core = BatchPull(wanted + wanted[:3], "v", b"")  # duplicates are asked once
    first = core.start().send
    assert [len(w.ids) for w in first] == [MAX_IDS, MAX_IDS]
    steps = answer_all(core, first[0])
    assert [len(s.send[0].ids) for s in steps if s.send] == [600 - 2 * MAX_IDS]
    commits = [s.commit for s in steps if s.commit]
    assert [len(c) for c in commits] == [MAX_IDS]  # COMMIT_BLOBS
    assert [b for b, _ in commits[0]] == wanted[:MAX_IDS]
    assert not core.done
    answer_all(core, first[1])
    last = core.unanswered()
    assert last == wanted[2 * MAX_IDS:]
    third = Want(2, [b.digest for b in last], "v", b"")
    steps = answer_all(core, third)
    assert len(steps[-1].commit) == len(last)  # nothing outstanding: the rest goes at once
    assert core.done and core.received == 600


def test_commits_by_bytes() -> None:
    core = BatchPull(ids(20), "v", b"", commit_bytes=3 * MAX_BLOB)
    want = core.start().send[0]
    steps = answer_all(core, want, bytes(MAX_BLOB))
    assert [len(s.commit) for s in steps if s.commit] == [3] * 6 + [2]


def test_skips_are_recorded_and_resume_asks_the_rest() -> None:
    wanted = ids(5)
    core = BatchPull(wanted, "v", b"", per_want=2)
    wants = core.start().send
    core.receive(Skip(0, 0, "not_found"))
    core.receive(Blob(0, 1, memoryview(b"a")))
    core.receive(Skip(1, 0, "too_large", 10**6))
    assert core.unanswered() == wanted[3:]
    assert [(s.blob_id, s.code, s.size) for s in core.skipped] == [
        (wanted[0], "not_found", 0), (wanted[2], "too_large", 10**6)]
    assert [len(w.ids) for w in wants] == [2, 2]
    assert core.take_held() == [(wanted[1], memoryview(b"a"))]


@pytest.mark.parametrize("msg", [
    Blob(1, 0, memoryview(b"x")),   # the second want answered before the first
    Blob(0, 1, memoryview(b"x")),   # a slot skipped
    Skip(0, 0, "maybe"),            # an unknown code
    Blob(0, 0, memoryview(bytes(MAX_BLOB + 1))),
    Error("boom"),
    Want(0, [], "v", b""),
], ids=["other want", "out of order", "unknown code", "too large", "error", "want"])
def test_lies_and_surprises_are_protocol_errors(msg: batch.BatchMessage) -> None:
    core = BatchPull(ids(3), "v", b"", per_want=2)
    core.start()
    with pytest.raises(ProtocolError):
        core.receive(msg)


def test_no_answer_without_a_want_nor_twice() -> None:
    core = BatchPull(ids(1), "v", b"")
    with pytest.raises(ProtocolError):
        core.receive(Blob(0, 0, memoryview(b"x")))  # nothing asked yet
    core.start()
    core.receive(Blob(0, 0, memoryview(b"x")))
    with pytest.raises(ProtocolError):
        core.receive(Blob(0, 0, memoryview(b"x")))  # answered already


def test_check_want() -> None:
    good = [hash_bytes(b"a").digest]
    want, got = batch.check_want(Want(3, good, "v", b""), 3)
    assert got == [hash_bytes(b"a")] and want.batch == 3
    for bad in (Want(2, good, "v", b""), Want(3, [], "v", b""),
                Want(3, good * (MAX_IDS + 1), "v", b""), Want(3, [b"short"], "v", b""),
                Want(3, good, "v", b"", version=2), Blob(3, 0, memoryview(b""))):
        with pytest.raises(ProtocolError):
            batch.check_want(bad, 3)


def test_malformed_bytes_are_protocol_errors() -> None:
    for raw in (b"\xc1", batch.encode(Want(0, [], "v", b""))[:-3],
                msgspec.msgpack.encode({"t": "blob", "batch": 0, "index": MAX_IDS, "data": b""})):
        with pytest.raises(ProtocolError):
            batch.decode(raw)
