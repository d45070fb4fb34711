"""The op log without a network: membership of authors, validators, what subscribers get."""

from __future__ import annotations

import time
from pathlib import Path

from blobmesh.errors import InvalidOpError
from blobmesh.space import Metrics, Op, SpaceConfig
from blobmesh.space.ops import OpLog
from blobmesh.space.records import sign_op
from blobmesh.space.store import OpStore, open_db
from blobmesh.transport.identity import Identity, NodeId

CFG = SpaceConfig(name="s")


def oplog(tmp: Path, members: set[NodeId]) -> tuple[OpLog, list[tuple[bytes, NodeId | None]]]:
    refused: list[tuple[bytes, NodeId | None]] = []
    store = OpStore(open_db(tmp / "s.sqlite"), "s", 3_600_000, CFG.limits, Metrics())
    log = OpLog(CFG, store, Metrics(), me=Identity.generate().node_id,
                is_member=members.__contains__, now_ms=lambda: int(time.time() * 1000),
                on_refused=lambda i, a: refused.append((i, a)))
    return log, refused


def op(author: Identity, kind: str, payload: bytes) -> Op:
    return sign_op(author, space="s", kind=kind, timestamp=int(time.time() * 1000),
                   payload=payload, limits=CFG.limits)


async def test_an_op_that_depends_on_another_in_its_batch_is_validated_again(
        tmp_path: Path) -> None:
    author = Identity.generate()
    log, refused = oplog(tmp_path, {author.node_id})
    seen: set[bytes] = set()

    def needs_request(o: Op) -> None:
        if o.payload.startswith(b"cancel:") and o.payload[7:] not in seen:
            raise InvalidOpError("cancel of an unknown request")
        seen.add(o.payload)

    log.register_kind("k", needs_request)
    cancel, request = op(author, "k", b"cancel:r1"), op(author, "k", b"r1")
    sub = log.subscribe("k", None)
    assert log.add([cancel.raw, request.raw], sender=None) == [request, cancel]
    assert refused == []
    assert [await sub.__anext__(), await sub.__anext__()] == [request, cancel]  # as stored


def test_ops_of_non_members_are_refused_with_their_author(tmp_path: Path) -> None:
    stranger = Identity.generate()
    log, refused = oplog(tmp_path, set())
    log.register_kind("k", None)
    o = op(stranger, "k", b"x")
    assert log.add([o.raw], sender=None) == []
    assert refused == [(o.id.digest, stranger.node_id)]
    unknown = op(stranger, "other", b"y")
    log2, refused2 = oplog(tmp_path / "2", {stranger.node_id})
    assert log2.add([unknown.raw], sender=None) == []
    assert refused2 == [(unknown.id.digest, None)]  # unknown kind: not the author's fault
