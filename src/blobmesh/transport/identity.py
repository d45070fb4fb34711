"""Node identities: Ed25519 key pairs whose public key is the node id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from blobmesh.hashing.ids import PrefixedId


@dataclass(frozen=True, slots=True, order=True, repr=False)
class NodeId(PrefixedId):
    """A node's Ed25519 public key; text form ``nd1`` + base32."""

    PREFIX: ClassVar[str] = "nd1"
    KIND: ClassVar[str] = "node id"
