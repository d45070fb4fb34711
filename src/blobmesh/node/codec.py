"""JSON forms of node and distribution state, shared by the control server and its clients."""

from __future__ import annotations

from typing import Any

from blobmesh.distribution.model import (
    DistributionHandle,
    DistributionState,
    DistributionStatus,
    Priority,
    Scope,
    TargetState,
    TargetStatus,
)
from blobmesh.hashing import BlobId
from blobmesh.transport.identity import NodeId


def status_to_json(s: DistributionStatus) -> dict[str, Any]:
    return {
        "handle": str(s.handle), "blob": str(s.blob_id), "size": s.size, "scope": str(s.scope),
        "priority": str(s.priority), "state": str(s.state), "started": s.started,
        "finished": s.finished, "export": s.export or None,
        "totals": {"targets": s.total, "completed": s.completed, "failed": s.failed,
                   "bytes_done": s.bytes_done, "bytes_total": s.bytes_total},
        "targets": [{"node": str(t.node), "state": str(t.state), "bytes_done": t.bytes_done,
                     "rate": t.rate, "reason": t.reason, "updated": t.updated,
                     "peers": t.peers, "sources": [str(n) for n in t.sources],
                     "source_rates": list(t.source_rates)}
                    for t in s.targets],
    }


def status_from_json(d: dict[str, Any]) -> DistributionStatus:
    return DistributionStatus(
        handle=DistributionHandle(d["handle"]), blob_id=BlobId.parse(d["blob"]),
        size=int(d["size"]), scope=Scope.parse(d["scope"]), priority=Priority.parse(d["priority"]),
        state=DistributionState(d["state"]),
        targets=tuple(TargetStatus(NodeId.parse(t["node"]), TargetState(t["state"]),
                                   int(t["bytes_done"]), float(t["rate"]), str(t["reason"]),
                                   float(t["updated"]), int(t.get("peers", 0)),
                                   tuple(NodeId.parse(n) for n in t.get("sources", ())),
                                   tuple(float(r) for r in t.get("source_rates", ())))
                      for t in d["targets"]),
        started=float(d["started"]), finished=d["finished"], export=d.get("export") or "")
