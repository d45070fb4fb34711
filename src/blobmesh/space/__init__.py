"""The space: membership, signed peer records, bootstrap, ops, gossip, failure detection.

See ``docs/space.md`` for the formats and the protocol.  The asyncio parts (:class:`Space`,
:class:`Subscription`) load on first use, so the sans-I/O cores import without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blobmesh.space.config import CapValue, Limits, Seed, SpaceConfig, Timing
    from blobmesh.space.membership import PeerMeta
    from blobmesh.space.metrics import Metrics
    from blobmesh.space.predicate import Predicate, parse_capability, parse_predicate
    from blobmesh.space.records import Op, OpId, PeerRecord
    from blobmesh.space.signer import Signer
    from blobmesh.space.space import PeerInfo, Space, endpoint_address_book
    from blobmesh.space.subscription import Subscription

_HOME = {
    "CapValue": "config", "Limits": "config", "Seed": "config", "SpaceConfig": "config",
    "Timing": "config", "Metrics": "metrics", "PeerMeta": "membership", "Predicate": "predicate",
    "parse_capability": "predicate", "parse_predicate": "predicate", "Op": "records",
    "OpId": "records", "PeerRecord": "records", "Signer": "signer", "PeerInfo": "space",
    "Space": "space", "endpoint_address_book": "space", "Subscription": "subscription",
}

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


def __getattr__(name: str) -> object:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
