"""The admission rule and the handshake of the space protocol (version 2), sans-I/O.

The dialer proves first: it sends an HMAC over the space name, both node ids and both sides'
fresh nonces, keyed by a key stretched from the space secret.  The acceptor answers with its own
proof only after checking the dialer's, so a stranger who dials a node learns nothing it could
test guesses of the secret against offline.  The proofs cannot be replayed to another peer,
space or session; the transport has already authenticated the node ids.  Without a secret (an
open space) the proofs still bind the space name.

:class:`DialerHandshake` and :class:`AcceptorHandshake` take handshake messages and return the
next one to send; they raise :class:`AdmissionError` (or :class:`ProtocolError`) to refuse.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from blobmesh.errors import AdmissionError, ProtocolError
from blobmesh.space import wire

if TYPE_CHECKING:  # annotations only: a sans-I/O core (the transport package is I/O)
    from blobmesh.space.config import SpaceConfig
    from blobmesh.transport.identity import NodeId

NONCE_SIZE = 16
_DOMAIN = b"blobmesh/space/handshake/v2"


@functools.lru_cache(maxsize=16)
def _stretch(secret: bytes, space: str) -> bytes:
    # ~20 ms and 16 MiB per guess: a secret chosen by a person is not brute-forced from a
    # captured proof at HMAC speed (a generated 32-byte secret is out of reach anyway)
    kdf = Scrypt(salt=b"blobmesh/space/key/v2\0" + space.encode(), length=32,
                 n=2 ** 14, r=8, p=1)
    return kdf.derive(secret)


def handshake_key(config: SpaceConfig) -> bytes:
    """The HMAC key of the handshake proofs (empty for an open space)."""
    return b"" if config.secret is None else _stretch(config.secret, config.name)


def proof(config: SpaceConfig, role: bytes, prover: NodeId, verifier: NodeId,
          dialer_nonce: bytes, acceptor_nonce: bytes) -> bytes:
    """The HMAC ``prover`` sends; ``role`` is ``b"dialer"`` or ``b"acceptor"``."""
    msg = b"\0".join([_DOMAIN, role, config.name.encode(), prover.digest, verifier.digest,
                      dialer_nonce, acceptor_nonce])
    return hmac.new(handshake_key(config), msg, hashlib.sha256).digest()


def admits(config: SpaceConfig, peer: NodeId) -> bool:
    """Whether the allowlist (if any) lets ``peer`` in."""
    return config.allowlist is None or peer in config.allowlist


class DialerHandshake:
    """Our side of a link we open: hello, then our proof, then check the acceptor's."""

    def __init__(self, config: SpaceConfig, me: NodeId, peer: NodeId, nonce: bytes) -> None:
        self._c, self._me, self._peer, self._nonce = config, me, peer, nonce
        self._acceptor_nonce = b""

    def hello(self) -> wire.Hello:
        return wire.Hello(self._c.name, wire.VERSION, self._nonce)

    def on_challenge(self, msg: wire.Handshake) -> wire.Auth:
        if isinstance(msg, wire.Refused):
            raise AdmissionError(f"{self._peer.short()} refused us: {msg.reason}",
                                 peer=self._peer)
        if not isinstance(msg, wire.Challenge) or len(msg.nonce) != NONCE_SIZE:
            raise ProtocolError("expected a handshake challenge")
        if not admits(self._c, self._peer):
            raise AdmissionError(f"{self._peer.short()} is not on our allowlist",
                                 peer=self._peer)
        self._acceptor_nonce = msg.nonce
        return wire.Auth(proof(self._c, b"dialer", self._me, self._peer, self._nonce, msg.nonce))

    def on_welcome(self, msg: wire.Handshake) -> None:
        """Raises unless ``msg`` is a welcome carrying the acceptor's valid proof."""
        if isinstance(msg, wire.Refused):
            raise AdmissionError(f"{self._peer.short()} refused us: {msg.reason}",
                                 peer=self._peer)
        if not isinstance(msg, wire.Welcome):
            raise ProtocolError("expected a handshake welcome")
        want = proof(self._c, b"acceptor", self._peer, self._me, self._nonce,
                     self._acceptor_nonce)
        if not hmac.compare_digest(want, msg.proof):
            raise AdmissionError(f"{self._peer.short()} is not admitted to space "
                                 f"{self._c.name!r} (bad proof)", peer=self._peer)


class AcceptorHandshake:
    """The side of a link a peer opened to us: challenge, then welcome only a valid proof.

    Each method returns the message to send; a :class:`wire.Refused` ends the handshake.
    """

    def __init__(self, config: SpaceConfig, me: NodeId, peer: NodeId, nonce: bytes) -> None:
        self._c, self._me, self._peer, self._nonce = config, me, peer, nonce
        self._dialer_nonce: bytes | None = None

    def on_hello(self, msg: wire.Handshake) -> wire.Challenge | wire.Refused:
        if not isinstance(msg, wire.Hello):
            return wire.Refused("expected hello")
        if msg.space != self._c.name:
            return wire.Refused("wrong space")
        if msg.version != wire.VERSION:
            return wire.Refused(f"unsupported version {msg.version} (this node speaks "
                                f"{wire.VERSION})")
        if len(msg.nonce) != NONCE_SIZE:
            return wire.Refused("malformed hello")
        if not admits(self._c, self._peer):
            return wire.Refused("not on the allowlist")
        self._dialer_nonce = msg.nonce
        return wire.Challenge(self._nonce)

    def on_auth(self, msg: wire.Handshake) -> wire.Welcome | wire.Refused:
        if self._dialer_nonce is None or not isinstance(msg, wire.Auth):
            return wire.Refused("expected auth")
        want = proof(self._c, b"dialer", self._peer, self._me, self._dialer_nonce, self._nonce)
        if not hmac.compare_digest(want, msg.proof):
            return wire.Refused("bad proof")
        return wire.Welcome(proof(self._c, b"acceptor", self._me, self._peer,
                                  self._dialer_nonce, self._nonce))
