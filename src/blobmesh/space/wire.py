"""Messages of the space protocol (``blobmesh/space/1``), with bounded decoding.

Each stream message is one msgpack array whose first element is the message tag (see
``docs/space.md``).  :func:`decode` refuses a message longer than ``max_message_bytes`` before
looking at it, and any list longer than ``max_elements`` right after decoding, before use
(the size bound already caps what decoding can allocate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from blobmesh.errors import ProtocolError

if TYPE_CHECKING:  # annotations only: the handshake core imports this module
    from blobmesh.space.config import Limits
    from blobmesh.space.metrics import Metrics

PROTOCOL = "blobmesh/space/1"
VERSION = 3
"""Protocol version, checked at the handshake: 2 had the dialer prove first (see
:mod:`blobmesh.space.admission`), 3 summarises peer records as a prefix tree
(:mod:`blobmesh.space.peertree`: ``g-tree``, and ``g-peers`` by prefix)."""


class _Msg(msgspec.Struct, array_like=True, tag_field="t"):
    pass


# --- handshake (first messages of every stream) -----------------------------------------------


class Hello(_Msg, tag="hello"):
    space: str
    version: int
    nonce: bytes


class Challenge(_Msg, tag="challenge"):
    nonce: bytes  # nothing derived from the secret: the dialer has not proved anything yet


class Auth(_Msg, tag="auth"):
    proof: bytes  # the dialer's


class Welcome(_Msg, tag="welcome"):
    proof: bytes  # the acceptor's, sent only once the dialer's proof checked out


class Refused(_Msg, tag="refused"):
    reason: str


# --- requests (client -> server), each carrying a request id ---------------------------------


class Ping(_Msg, tag="ping"):
    rid: int


class PingReq(_Msg, tag="ping-req"):
    rid: int
    target: bytes


class PushRecords(_Msg, tag="push-records"):
    rid: int
    records: list[bytes]
    relay: bool  # forward new ones once to our peers (with relay false)


class PushOps(_Msg, tag="push-ops"):
    rid: int
    ops: list[bytes]
    relay: bool  # forward new ones once to our peers (with relay false)


class Fetch(_Msg, tag="fetch"):
    rid: int
    ids: list[bytes]


class Notify(_Msg, tag="notify"):
    rid: int
    data: bytes


class GossipHello(_Msg, tag="g-hello"):
    rid: int
    session: bytes
    peers_digest: bytes
    ops_digest: bytes
    children: bytes  # the client's root children digests (16 × 8 bytes; b"": it lists all)
    mask: int        # bit i: send your children digests of child i if it differs


class PeerTreeReq(_Msg, tag="g-tree"):
    rid: int
    session: bytes
    prefixes: list[int]  # node-id prefixes whose digests differ
    digests: bytes       # the client's 16 children digests (8 bytes each) per prefix
    masks: list[int]     # per prefix, bit i: send your children digests of child i if it differs


class PeerSummary(_Msg, tag="g-peers"):
    rid: int
    session: bytes
    prefixes: list[int]  # node-id prefixes whose every record this message lists
    entries: list[tuple[bytes, int]]  # (node id, created_at) of those records
    complete: bool  # the round's last listing


class OpSummary(_Msg, tag="g-ops"):
    rid: int
    session: bytes
    buckets: list[tuple[int, int, bytes]]  # (bucket, count, digest), non-empty buckets only


class OpIdsReq(_Msg, tag="g-ids"):
    rid: int
    session: bytes
    after: bytes  # resume after this id (b"" to start)


# --- responses (server -> client) ------------------------------------------------------------


class Ack(_Msg, tag="ack"):
    rid: int


class Nack(_Msg, tag="nack"):
    rid: int


class Busy(_Msg, tag="busy"):
    rid: int
    retry_after_ms: int


class Error(_Msg, tag="error"):
    rid: int
    reason: str


class GossipState(_Msg, tag="g-state"):
    rid: int
    peers_digest: bytes
    ops_digest: bytes
    prefixes: list[int]  # if the peers digests differ: the root's children that differ
    digests: bytes       # and the server's children digests of those the mask marks


class PeerTreeDiff(_Msg, tag="g-tree-diff"):
    rid: int
    prefixes: list[int]  # the children of the asked prefixes whose digests differ, in order
    digests: bytes       # the server's children digests of those of them the masks mark


class PeerDiff(_Msg, tag="g-peer-diff"):
    rid: int
    records: list[bytes]  # ours that are newer or unknown to the client
    want: list[bytes]     # node ids whose record the client holds newer


class OpDiff(_Msg, tag="g-op-diff"):
    rid: int
    buckets: list[int]  # buckets whose contents differ


class OpIds(_Msg, tag="g-op-ids"):
    rid: int
    ids: list[tuple[int, bytes]]  # (bucket, op id), in id order within the differing buckets
    done: bool


class Ops(_Msg, tag="ops"):
    rid: int
    ops: list[bytes]
    missing: list[bytes]


Handshake = Hello | Challenge | Auth | Welcome | Refused
Request = Ping | PingReq | PushRecords | PushOps | Fetch | Notify | GossipHello | PeerTreeReq \
    | PeerSummary | OpSummary | OpIdsReq
Response = Ack | Nack | Busy | Error | GossipState | PeerTreeDiff | PeerDiff | OpDiff | OpIds \
    | Ops
Message = Handshake | Request | Response

_encoder = msgspec.msgpack.Encoder()
_handshake_dec = msgspec.msgpack.Decoder(Handshake)
_request_dec = msgspec.msgpack.Decoder(Request)
_response_dec = msgspec.msgpack.Decoder(Response)
_LIST_FIELDS = ("records", "ops", "ids", "missing", "prefixes", "masks", "entries", "buckets",
                "want")


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def _decode(raw: bytes, decoder: msgspec.msgpack.Decoder[Any], what: str, limits: Limits,
            metrics: Metrics) -> Any:
    if len(raw) > limits.max_message_bytes:
        metrics.limit("message_bytes")
        raise ProtocolError(f"message of {len(raw)} bytes exceeds {limits.max_message_bytes}")
    try:
        msg = decoder.decode(raw)
    except msgspec.DecodeError as exc:
        metrics.inc("malformed_messages")
        raise ProtocolError(f"malformed {what} message: {exc}") from exc
    for name in _LIST_FIELDS:
        items = getattr(msg, name, None)
        if items is not None and len(items) > limits.max_elements:
            metrics.limit("message_elements")
            raise ProtocolError(f"{type(msg).__name__} carries {len(items)} {name} "
                                f"(limit {limits.max_elements})")
    return msg


def decode_handshake(raw: bytes, limits: Limits, metrics: Metrics) -> Handshake:
    """Decode a handshake message (size checked first, list lengths right after)."""
    msg: Handshake = _decode(raw, _handshake_dec, "handshake", limits, metrics)
    return msg


def decode_request(raw: bytes, limits: Limits, metrics: Metrics) -> Request:
    """Decode a request (size checked first, list lengths right after)."""
    msg: Request = _decode(raw, _request_dec, "request", limits, metrics)
    return msg


def decode_response(raw: bytes, limits: Limits, metrics: Metrics) -> Response:
    """Decode a response (size checked first, list lengths right after)."""
    msg: Response = _decode(raw, _response_dec, "response", limits, metrics)
    return msg
