"""The signing interface a space needs.

The transport's :class:`~blobmesh.transport.identity.Identity` satisfies it; anything else with
``node_id`` and ``sign(bytes) -> bytes`` (an HSM, a test double) can stand in for it.
Verification is the transport's :func:`~blobmesh.transport.identity.verify_signature`.
"""

from __future__ import annotations

from typing import Protocol

from blobmesh.transport.identity import NodeId


class Signer(Protocol):
    """Signs on behalf of one node; the node id is its Ed25519 public key."""

    @property
    def node_id(self) -> NodeId: ...

    def sign(self, message: bytes) -> bytes: ...
