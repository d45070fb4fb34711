"""The space: membership, signed peer records, bootstrap, ops, gossip, failure detection.

See ``docs/space.md`` for the formats and the protocol.
"""

from blobmesh.space.config import CapValue, Limits, Seed, SpaceConfig, Timing
from blobmesh.space.metrics import Metrics
from blobmesh.space.predicate import Predicate, parse_capability, parse_predicate
from blobmesh.space.records import Op, OpId, PeerRecord
from blobmesh.space.signer import Signer
from blobmesh.space.space import PeerInfo, Space, endpoint_address_book
from blobmesh.space.store import PeerMeta
from blobmesh.space.subscription import Subscription

__all__ = [
    "CapValue",
    "Limits",
    "Metrics",
    "Op",
    "OpId",
    "PeerInfo",
    "PeerMeta",
    "PeerRecord",
    "Predicate",
    "Seed",
    "Signer",
    "Space",
    "SpaceConfig",
    "Subscription",
    "Timing",
    "endpoint_address_book",
    "parse_capability",
    "parse_predicate",
]
