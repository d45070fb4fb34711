"""Batched pulls of small blobs: the ``blobmesh/transfer-batch/1`` protocol (``docs/transfer.md``).

A channel costs a stream, about six messages, a row in ``transfer.sqlite`` and a commit per
blob; for many small blobs that overhead is the whole cost.  Here one stream carries them all:
the receiver sends ``want`` messages naming up to :data:`MAX_IDS` blob ids each, the responder
answers every id of every want, in order, with the blob's bytes (``blob``) or the reason it
does not send it (``skip``).  :class:`BatchPull` is the receiver's sans-I/O core: it keeps a
few wants in flight, checks every answer against what it asked, and hands the received bytes
on in commit batches (verified against their ids and stored in one transaction each by the
caller).  Nothing is persisted: the receiver's store is the truth, so an interrupted batch is
resumed by asking again for the ids not stored yet.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated

import msgspec

from blobmesh.errors import ProtocolError
from blobmesh.hashing import BlobId
from blobmesh.hashing.tree import MIN_PIECE_SIZE
from blobmesh.transfer.messages import Codec, Error

BATCH_PROTOCOL = "blobmesh/transfer-batch/1"
BATCH_VERSION = 1
MAX_IDS = 256
"""Blob ids in one ``want``."""
MAX_BLOB = MIN_PIECE_SIZE
"""The largest blob a batch carries (one piece at the smallest piece size); larger blobs are
answered ``too_large`` and move through channels."""
WANTS_IN_FLIGHT = 2
"""Wants a receiver keeps outstanding, so the responder never waits for the next one."""
COMMIT_BYTES = 4 * 1024 * 1024
COMMIT_BLOBS = 256
"""A receiver commits what it received every this many bytes or blobs (and when idle)."""

SKIP_CODES = frozenset({"not_found", "too_large", "rejected", "unavailable"})
"""Why a responder does not send a blob: not here (complete), larger than :data:`MAX_BLOB`,
refused by its validator, or unreadable (e.g. corrupt on its disk)."""

Seq = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
Slot = Annotated[int, msgspec.Meta(ge=0, lt=MAX_IDS)]


class _Msg(msgspec.Struct, tag_field="t", forbid_unknown_fields=False):
    pass


class Want(_Msg, tag="want"):
    """Receiver -> responder: send these blobs (want numbers count up from 0 per stream)."""

    batch: Seq
    ids: list[bytes]
    voucher_type: str
    voucher: bytes
    version: int = BATCH_VERSION


class Blob(_Msg, tag="blob"):
    """Responder -> receiver: the whole content of ``ids[index]`` of want ``batch``.

    ``data`` decodes as a view into the received message (no copy)."""

    batch: Seq
    index: Slot
    data: memoryview


class Skip(_Msg, tag="skip"):
    """Responder -> receiver: ``ids[index]`` of want ``batch`` is not sent (``code`` in
    :data:`SKIP_CODES`; ``size`` for ``too_large``)."""

    batch: Seq
    index: Slot
    code: str
    size: Annotated[int, msgspec.Meta(ge=0, le=2**50)] = 0
    message: str = ""


BatchMessage = Want | Blob | Skip | Error

_codec: Codec[BatchMessage] = Codec(BatchMessage, "batch")
encode = _codec.encode
decode = _codec.decode


def check_want(msg: BatchMessage, expected: int) -> tuple[Want, list[BlobId]]:
    """Responder: a valid want numbered ``expected`` and its ids; ProtocolError otherwise."""
    if not isinstance(msg, Want):
        raise ProtocolError(f"expected a want, got {type(msg).__name__}")
    if msg.version != BATCH_VERSION:
        raise ProtocolError(f"batch protocol version {msg.version} is not supported")
    if msg.batch != expected:
        raise ProtocolError(f"want {msg.batch} out of order (expected {expected})")
    if not 1 <= len(msg.ids) <= MAX_IDS:
        raise ProtocolError(f"a want names 1 to {MAX_IDS} blobs, not {len(msg.ids)}")
    if any(len(raw) != 32 for raw in msg.ids):
        raise ProtocolError("want names a malformed blob id")
    return msg, [BlobId(raw) for raw in msg.ids]


@dataclass(frozen=True, slots=True)
class Skipped:
    """A blob the responder did not send, and why (``code`` in :data:`SKIP_CODES`)."""

    blob_id: BlobId
    code: str
    size: int
    message: str


@dataclass(slots=True)
class BatchStep:
    """What the receiver's I/O layer must do after a call into :class:`BatchPull`."""

    send: list[Want] = field(default_factory=list)
    commit: list[tuple[BlobId, memoryview]] = field(default_factory=list)
    """Received blobs, unverified: check each against its id and store them (one commit)."""


class BatchPull:
    """The receiver's side of one batch stream (sans I/O).

    Memory is bounded: at most :data:`WANTS_IN_FLIGHT` wants are outstanding, and received
    bytes are handed on once :data:`COMMIT_BYTES` or :data:`COMMIT_BLOBS` accumulate (the I/O
    layer reads no further while a commit batch waits), so what it holds is one commit batch
    plus the transport's stream window.
    """

    def __init__(self, blob_ids: Iterable[BlobId], voucher_type: str, voucher: bytes, *,
                 per_want: int = MAX_IDS, commit_bytes: int = COMMIT_BYTES,
                 commit_blobs: int = COMMIT_BLOBS) -> None:
        if not 1 <= per_want <= MAX_IDS:
            raise ValueError(f"per_want must be 1..{MAX_IDS}")
        self._todo: deque[BlobId] = deque(dict.fromkeys(blob_ids))
        self._voucher = (voucher_type, voucher)
        self._per_want = per_want
        self._commit_bytes = commit_bytes
        self._commit_blobs = commit_blobs
        self._wants: deque[tuple[int, list[BlobId]]] = deque()
        self._answered = 0
        """Answers received for the oldest outstanding want."""
        self._seq = 0
        self._held: list[tuple[BlobId, memoryview]] = []
        self._held_bytes = 0
        self.skipped: list[Skipped] = []
        self.received = 0
        """Blobs received (handed on for commit)."""

    @property
    def done(self) -> bool:
        """Every id was answered and everything received was handed on."""
        return not self._todo and not self._wants and not self._held

    def start(self) -> BatchStep:
        """The first wants."""
        step = BatchStep()
        self._fill(step)
        return step

    def receive(self, msg: BatchMessage) -> BatchStep:
        """One message from the responder; ProtocolError when it is not the answer due next
        (a blob or skip for an id we did not ask, out of order, twice, or too large) and
        when the peer sent ``error``."""
        step = BatchStep()
        match msg:
            case Blob() | Skip():
                blob_id = self._expect(msg.batch, msg.index)
                if isinstance(msg, Blob):
                    if len(msg.data) > MAX_BLOB:
                        raise ProtocolError(f"batched blob {blob_id.short()} has "
                                            f"{len(msg.data)} bytes, over {MAX_BLOB}")
                    self._held.append((blob_id, msg.data))
                    self._held_bytes += len(msg.data)
                    self.received += 1
                else:
                    if msg.code not in SKIP_CODES:
                        raise ProtocolError(f"unknown skip code {msg.code!r}")
                    self.skipped.append(Skipped(blob_id, msg.code, msg.size, msg.message))
                self._advance(step)
            case Error():
                raise ProtocolError(f"peer failed the batch: {msg.message}")
            case _:
                raise ProtocolError(f"unexpected {type(msg).__name__} from the responder")
        return step

    def unanswered(self) -> list[BlobId]:
        """Ids asked or to ask that got no answer yet (to ask again on a new stream)."""
        out: list[BlobId] = []
        for i, (_, ids) in enumerate(self._wants):
            out += ids[self._answered:] if i == 0 else ids
        return out + list(self._todo)

    def take_held(self) -> list[tuple[BlobId, memoryview]]:
        """Whatever was received and not handed on yet (when the stream broke)."""
        held, self._held, self._held_bytes = self._held, [], 0
        return held

    def _expect(self, batch: int, index: int) -> BlobId:
        if not self._wants:
            raise ProtocolError("an answer with no want outstanding")
        seq, ids = self._wants[0]
        if batch != seq or index != self._answered:
            raise ProtocolError(f"answer for want {batch} slot {index}, expected want {seq} "
                                f"slot {self._answered}")
        return ids[index]

    def _advance(self, step: BatchStep) -> None:
        self._answered += 1
        if self._answered == len(self._wants[0][1]):
            self._wants.popleft()
            self._answered = 0
            self._fill(step)
        if (self._held_bytes >= self._commit_bytes or len(self._held) >= self._commit_blobs
                or not self._wants):
            step.commit = self.take_held()

    def _fill(self, step: BatchStep) -> None:
        while self._todo and len(self._wants) < WANTS_IN_FLIGHT:
            ids = [self._todo.popleft() for _ in range(min(self._per_want, len(self._todo)))]
            self._wants.append((self._seq, ids))
            step.send.append(Want(self._seq, [b.digest for b in ids], *self._voucher))
            self._seq += 1
