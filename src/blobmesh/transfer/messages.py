"""Wire messages of the transfer protocol, version 1 (``docs/transfer.md``).

Every message is a msgpack map tagged by ``t``.  One channel uses one stream: the initiator
opens it and sends a :class:`Request`; everything after that flows on the same stream.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar

import msgspec

from blobmesh.errors import ProtocolError
from blobmesh.hashing import BlobId, PieceLayer, piece_count
from blobmesh.wire import payload_head

PROTOCOL = "blobmesh/transfer/1"
VERSION = 1
MAX_CHUNK = 1024 * 1024
"""Largest data payload in one message; bigger pieces travel as several chunks."""

M = TypeVar("M")

Index = Annotated[int, msgspec.Meta(ge=0, le=2**40)]


class Selector(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which part of a blob to move: everything (the default), byte ranges, or pieces.

    Byte ranges select every piece they touch: pieces are the unit of verification.
    """

    ranges: tuple[tuple[Index, Index], ...] | None = None
    """``(offset, length)`` pairs."""
    pieces: tuple[Index, ...] | None = None

    @classmethod
    def whole(cls) -> Selector:
        return cls()

    @classmethod
    def byte_ranges(cls, *ranges: tuple[int, int]) -> Selector:
        return cls(ranges=tuple(ranges))

    @classmethod
    def piece_set(cls, pieces: list[int] | tuple[int, ...] | set[int]) -> Selector:
        return cls(pieces=tuple(sorted(pieces)))

    def resolve(self, size: int, piece_size: int) -> list[int]:
        """Sorted piece indices selected in a blob of ``size`` bytes; raises ProtocolError
        when the selector points outside the blob."""
        count = piece_count(size, piece_size)
        chosen: set[int] = set()
        if self.ranges is None and self.pieces is None:
            return list(range(count))
        for off, length in self.ranges or ():
            if length == 0:
                continue
            if off + length > size:
                raise ProtocolError(f"byte range {off}+{length} is past the end ({size})")
            chosen.update(range(off // piece_size, (off + length - 1) // piece_size + 1))
        for i in self.pieces or ():
            if i >= count:
                raise ProtocolError(f"piece {i} is out of range (blob has {count})")
            chosen.add(i)
        return sorted(chosen)


class Layer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A piece layer on the wire; :meth:`verify` checks it against the blob id."""

    size: Annotated[int, msgspec.Meta(ge=0, le=2**50)]
    piece_size: Annotated[int, msgspec.Meta(ge=1, le=2**30)]
    hashes: bytes

    @classmethod
    def of(cls, layer: PieceLayer) -> Layer:
        return cls(layer.size, layer.piece_size, layer.to_bytes())

    def verify(self, blob_id: BlobId) -> PieceLayer:
        """The verified :class:`PieceLayer` (raises VerificationError/ValueError if wrong)."""
        return PieceLayer.from_bytes(blob_id, self.size, self.piece_size, self.hashes)


class _Msg(msgspec.Struct, tag_field="t", forbid_unknown_fields=False):
    pass


class Request(_Msg, tag="request"):
    """Initiator -> responder: open (or, with ``restart``, resume) a channel."""

    transfer_id: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    pull: bool
    blob_id: bytes
    voucher_type: str
    voucher: bytes
    selector: Selector = Selector()
    restart: bool = False
    paused: bool = False
    """The initiator has the channel paused (a restart keeps the pause)."""
    layer: Layer | None = None
    """Push: the sender's piece layer."""
    have: bytes | None = None
    """Pull: the receiver's verified-piece bitfield, when it holds part of the blob."""
    version: int = VERSION


class Response(_Msg, tag="response"):
    """Responder -> initiator: the validator's verdict on a request."""

    accepted: bool
    paused: bool = False
    result_type: str = ""
    result: bytes = b""
    message: str = ""
    layer: Layer | None = None
    """Pull: the sender's piece layer."""
    have: bytes | None = None
    """Push: the receiver's verified-piece bitfield."""
    code: str = "rejected"
    """Why a request was refused: ``rejected`` (by the validator), ``not_found`` (no such
    blob here) or ``unavailable`` (e.g. the receiver's disk is full)."""


class Data(_Msg, tag="data"):
    """Sender -> receiver: bytes of one piece, starting at ``offset`` within it.

    ``data`` decodes as a view into the received message (no copy of the payload).
    """

    piece: Index
    offset: Index
    data: memoryview


class Ack(_Msg, tag="ack"):
    """Receiver -> sender: these pieces are verified and durable."""

    pieces: list[Index]


class Pause(_Msg, tag="pause"):
    """The sending side pauses the channel."""


class Resume(_Msg, tag="resume"):
    """The sending side lifts its pause."""


class VoucherUpdate(_Msg, tag="voucher"):
    """Initiator -> responder: a new voucher (answering a revalidation demand)."""

    voucher_type: str
    voucher: bytes


class VoucherResult(_Msg, tag="voucher-result"):
    """Responder -> initiator: a revalidation verdict or demand.

    ``paused`` demands a new voucher before more data moves (``final``: before completing).
    """

    accepted: bool
    paused: bool = False
    final: bool = False
    result_type: str = ""
    result: bytes = b""
    message: str = ""


class Complete(_Msg, tag="complete"):
    """Responder -> initiator: the channel is done."""


class Cancel(_Msg, tag="cancel"):
    """Either side: the channel is cancelled."""

    reason: str = ""


class Error(_Msg, tag="error"):
    """Either side: the channel failed on our end; ``bad_data`` when the peer sent bad bytes."""

    message: str
    bad_data: bool = False


Message = (Request | Response | Data | Ack | Pause | Resume | VoucherUpdate | VoucherResult
           | Complete | Cancel | Error)

class Codec(Generic[M]):
    """msgpack encoding of one message union: :meth:`decode` turns anything malformed or
    unknown into a :class:`ProtocolError` that names the protocol."""

    _encoder = msgspec.msgpack.Encoder()

    def __init__(self, union: Any, protocol: str) -> None:
        self._decoder: msgspec.msgpack.Decoder[M] = msgspec.msgpack.Decoder(union)
        self._protocol = protocol

    def encode(self, msg: M) -> bytes:
        return self._encoder.encode(msg)

    def decode(self, raw: bytes | memoryview) -> M:
        try:
            return self._decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"malformed {self._protocol} message: {exc}") from exc


_codec: Codec[Message] = Codec(Message, "transfer")
encode = _codec.encode
decode = _codec.decode


def data_head(piece: int, offset: int, n: int) -> bytes:
    """The head of ``encode(Data(piece, offset, data))`` for ``n`` bytes of data: the message
    is this head followed by the data as it is (``data`` is the last field), so a piece is
    sent with ``Stream.send(data, head=...)`` and never copied into a message."""
    return payload_head(encode(Data(piece, offset, memoryview(b""))), n)
