"""The swarm protocol (``blobmesh-swarm/1``): piece exchange among a distribution's nodes.

Sans-I/O: :class:`SwarmSession` turns received stream messages into typed events and builds
the messages to send; the asyncio layer (``swarm.py``) moves them over a transport stream.
Every message is one msgpack-encoded, tagged struct (see ``docs/distribution.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from blobmesh.errors import ProtocolError
from blobmesh.hashing import DIGEST_SIZE, BlobId
from blobmesh.types import Bitfield
from blobmesh.wire import payload_head

PROTOCOL = "blobmesh-swarm/1"
REJECT_ELSEWHERE = "held by other peers"
"""The reason a seed gives when it points a requester at the other holders of a piece."""
REJECT_BUSY = "busy"
"""The reason a downloading peer gives when requests already wait for its upload."""
VERSION = 2
"""2: ``haves`` (several pieces, sent only to peers that lack them or sent them) and
``have-all`` replace version 1's ``have``; a hello of another version is refused by name."""
MAX_PIECES = 1 << 22


class _Msg(msgspec.Struct, tag_field="t", array_like=True):
    pass


class Hello(_Msg, tag="hello"):
    version: int
    blob: bytes
    size: int
    piece_size: int
    have: bytes  # bitfield; all zero when the sender holds nothing yet
    has_layer: bool
    priority: int


class LayerRequest(_Msg, tag="layer?"):
    pass


class Layer(_Msg, tag="layer"):
    hashes: bytes


class Haves(_Msg, tag="haves"):
    indices: list[int]


class HaveAll(_Msg, tag="have-all"):
    pass


class Request(_Msg, tag="req"):
    index: int


class Piece(_Msg, tag="piece"):
    index: int
    data: memoryview
    """Decodes as a view into the received message: the piece is not copied."""


class Reject(_Msg, tag="rej"):
    index: int
    reason: str


class Cancel(_Msg, tag="cancel"):
    index: int


class Bye(_Msg, tag="bye"):
    reason: str


Message = Hello | LayerRequest | Layer | Haves | HaveAll | Request | Piece | Reject | Cancel | Bye

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def _decode(raw: bytes) -> Message:
    try:
        msg: Message = _decoder.decode(raw)
        return msg
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed swarm message: {exc}") from exc


def peek_hello(raw: bytes) -> Hello:
    """Decode the first message of an incoming stream, which must be a hello (any blob)."""
    msg = _decode(raw)
    if not isinstance(msg, Hello):
        raise ProtocolError(f"expected hello, got {type(msg).__name__}")
    return msg


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerHello:
    have: Bitfield
    has_layer: bool
    priority: int


@dataclass(frozen=True, slots=True)
class LayerWanted:
    pass


@dataclass(frozen=True, slots=True)
class LayerArrived:
    raw: bytes


@dataclass(frozen=True, slots=True)
class PeerHas:
    """The peer holds these pieces now (the ones we did not know of; ``have-all``: all the
    rest), ascending."""

    indices: list[int]


@dataclass(frozen=True, slots=True)
class PieceWanted:
    index: int


@dataclass(frozen=True, slots=True)
class PieceArrived:
    """A piece we asked for; ``late``: we had cancelled the request (it crossed the cancel)."""

    index: int
    data: bytes | memoryview
    late: bool = False


@dataclass(frozen=True, slots=True)
class PieceRefused:
    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class WantCancelled:
    index: int


@dataclass(frozen=True, slots=True)
class PeerLeft:
    reason: str


Event = (PeerHello | LayerWanted | LayerArrived | PeerHas | PieceWanted | PieceArrived
         | PieceRefused | WantCancelled | PeerLeft)


class SwarmSession:
    """One side of a swarm conversation about one blob with one peer.

    Enforces the protocol: ``hello`` first (for the same blob, size and piece size), piece
    indices in range, pieces only in answer to our requests, a layer only when asked for.
    Violations raise :class:`ProtocolError`, after which the session must be dropped.  A
    piece (or refusal) of a request we cancelled is no violation: it crossed the ``cancel``
    on the wire, so it is delivered as ``PieceArrived(late=True)`` (or dropped, if refused).
    """

    def __init__(self, blob_id: BlobId, size: int, piece_size: int, *,
                 max_piece_size: int | None = None) -> None:
        self.blob_id = blob_id
        self.size = size
        self.piece_size = piece_size
        self.pieces = max(1, -(-size // piece_size))
        if self.pieces > MAX_PIECES:
            raise ProtocolError(f"blob has too many pieces ({self.pieces})")
        self.max_piece_size = max_piece_size or piece_size
        self.peer_hello: PeerHello | None = None
        self.peer_have = Bitfield(self.pieces)
        self.sent_hello = False
        self._requested: set[int] = set()
        self._cancelled: set[int] = set()  # answers to these may still be on the wire
        self._layer_asked = False

    # --- outgoing --------------------------------------------------------------------------

    def hello(self, have: Bitfield, has_layer: bool, priority: int) -> bytes:
        self.sent_hello = True
        return _encoder.encode(Hello(VERSION, self.blob_id.digest, self.size, self.piece_size,
                                     have.to_bytes(), has_layer, priority))

    def request_layer(self) -> bytes:
        self._layer_asked = True
        return _encoder.encode(LayerRequest())

    def layer(self, raw: bytes) -> bytes:
        return _encoder.encode(Layer(raw))

    def haves(self, indices: list[int]) -> bytes:
        """Announce pieces we verified and wrote (at least one)."""
        return _encoder.encode(Haves(indices))

    def have_all(self) -> bytes:
        """Announce that we hold every piece now."""
        return _encoder.encode(HaveAll())

    def request(self, index: int) -> bytes:
        self._check_index(index)
        self._requested.add(index)
        self._cancelled.discard(index)
        return _encoder.encode(Request(index))

    def piece_head(self, index: int, n: int) -> bytes:
        """The message of an ``n``-byte piece is this head followed by the piece's bytes."""
        return payload_head(_encoder.encode(Piece(index, memoryview(b""))), n)

    def reject(self, index: int, reason: str) -> bytes:
        return _encoder.encode(Reject(index, reason[:200]))

    def cancel(self, index: int) -> bytes:
        if index in self._requested:
            self._requested.discard(index)
            self._cancelled.add(index)
        return _encoder.encode(Cancel(index))

    def bye(self, reason: str) -> bytes:
        return _encoder.encode(Bye(reason[:200]))

    # --- incoming --------------------------------------------------------------------------

    def receive(self, raw: bytes) -> Event | None:
        """The event a received message means; None for a refusal that crossed a cancel, or
        for haves that name only pieces we knew the peer holds."""
        msg = _decode(raw)
        if self.peer_hello is None and not isinstance(msg, Hello | Bye):
            raise ProtocolError(f"swarm peer sent {type(msg).__name__} before hello")
        match msg:
            case Hello():
                return self._on_hello(msg)
            case LayerRequest():
                return LayerWanted()
            case Layer(hashes=hashes):
                if not self._layer_asked:
                    raise ProtocolError("unsolicited piece layer")
                if len(hashes) != self.pieces * DIGEST_SIZE:
                    raise ProtocolError("piece layer of the wrong length")
                self._layer_asked = False
                return LayerArrived(hashes)
            case Haves(indices=indices):
                if not 0 < len(indices) <= self.pieces:
                    raise ProtocolError(f"haves names {len(indices)} pieces")
                have = self.peer_have
                new = []
                for index in indices:
                    self._check_index(index)
                    if index not in have:
                        have.add(index)
                        new.append(index)
                return PeerHas(new) if new else None
            case HaveAll():
                have = self.peer_have
                new = [i for i in range(self.pieces) if i not in have]
                have.update(new)
                return PeerHas(new) if new else None
            case Request(index=index):
                self._check_index(index)
                return PieceWanted(index)
            case Piece(index=index, data=data):
                self._check_index(index)
                if len(data) > self.max_piece_size:
                    raise ProtocolError(f"piece {index} is oversized")
                if index in self._requested:
                    self._requested.discard(index)
                    return PieceArrived(index, data)
                if index in self._cancelled:
                    self._cancelled.discard(index)
                    return PieceArrived(index, data, late=True)
                raise ProtocolError(f"unsolicited piece {index}")
            case Reject(index=index, reason=reason):
                self._check_index(index)
                if index in self._requested:
                    self._requested.discard(index)
                    return PieceRefused(index, reason)
                self._cancelled.discard(index)
                return None
            case Cancel(index=index):
                self._check_index(index)
                return WantCancelled(index)
            case Bye(reason=reason):
                return PeerLeft(reason)
        raise ProtocolError("unknown swarm message")  # pragma: no cover - exhaustive match

    def _on_hello(self, msg: Hello) -> PeerHello:
        if self.peer_hello is not None:
            raise ProtocolError("second hello")
        if msg.version != VERSION:
            raise ProtocolError(f"swarm peer speaks version {msg.version} of "
                                f"{PROTOCOL}, this node version {VERSION}: upgrade the older "
                                "node")
        if msg.blob != self.blob_id.digest or msg.size != self.size or \
                msg.piece_size != self.piece_size:
            raise ProtocolError("hello names another blob or geometry")
        try:
            have = Bitfield(self.pieces, msg.have)
        except ValueError as exc:
            raise ProtocolError(f"bad bitfield in hello: {exc}") from exc
        self.peer_hello = PeerHello(have, msg.has_layer, msg.priority)
        self.peer_have = have.copy()
        return self.peer_hello

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.pieces:
            raise ProtocolError(f"piece index {index} out of range (0..{self.pieces - 1})")

    @property
    def peer_complete(self) -> bool:
        return self.peer_have.is_complete()

    @property
    def outstanding(self) -> set[int]:
        """Pieces we requested and have not received or been refused."""
        return set(self._requested)
