"""The admission rule and the handshake proofs of the space protocol.

Both sides prove knowledge of the space secret with an HMAC over the space name, both node ids
(in the prover's order) and both sides' fresh nonces, so a proof cannot be replayed to another
peer, in another space or in another session.  The transport has already authenticated the node
ids; without a secret the proof still binds the space name.
"""

from __future__ import annotations

import hashlib
import hmac

from blobmesh.space.config import SpaceConfig
from blobmesh.transport.identity import NodeId

NONCE_SIZE = 16


def proof(config: SpaceConfig, role: bytes, prover: NodeId, verifier: NodeId,
          client_nonce: bytes, server_nonce: bytes) -> bytes:
    """The HMAC ``prover`` sends; ``role`` is ``b"client"`` or ``b"server"``."""
    msg = b"\0".join([b"blobmesh/space/handshake/v1", role, config.name.encode(),
                      prover.digest, verifier.digest, client_nonce, server_nonce])
    return hmac.new(config.secret or b"", msg, hashlib.sha256).digest()


def check_proof(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


def admits(config: SpaceConfig, peer: NodeId) -> bool:
    """Whether the allowlist (if any) lets ``peer`` in."""
    return config.allowlist is None or peer in config.allowlist
