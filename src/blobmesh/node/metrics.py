"""Prometheus text exposition of a node's counters and gauges."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from blobmesh.distribution.model import DistributionState
from blobmesh.distribution.swarm import BanKind

if TYPE_CHECKING:
    from blobmesh.node.daemon import Node

_NAME = re.compile(r"[^a-zA-Z0-9_]")


def _metric(lines: list[str], name: str, kind: str, value: float, help_text: str,
            labels: str = "") -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    lines.append(f"{name}{labels} {value}")


def render_metrics(node: Node) -> str:
    lines: list[str] = []
    _metric(lines, "blobmesh_node_info", "gauge", 1, "node identity",
            f'{{node="{node.identity.node_id}",space="{node.config.space}"}}')
    blobs = node.store.blobs()
    _metric(lines, "blobmesh_store_blobs", "gauge", sum(b.complete for b in blobs),
            "complete blobs in the store")
    _metric(lines, "blobmesh_store_partial_blobs", "gauge", sum(not b.complete for b in blobs),
            "partial blobs in the store")
    _metric(lines, "blobmesh_store_bytes", "gauge", sum(b.bytes_present for b in blobs),
            "bytes of verified blob data held")
    sw = node.swarm
    _metric(lines, "blobmesh_swarm_uploaded_bytes_total", "counter", sw.bytes_uploaded,
            "piece bytes sent to peers")
    _metric(lines, "blobmesh_swarm_downloaded_bytes_total", "counter", sw.bytes_downloaded,
            "verified piece bytes received from peers")
    _metric(lines, "blobmesh_swarm_pieces_rejected_total", "counter", sw.pieces_rejected,
            "pieces that failed verification (their senders were banned)")
    _metric(lines, "blobmesh_swarm_connections", "gauge", sw.connections,
            "open swarm connections")
    _metric(lines, "blobmesh_swarm_connections_refused_total", "counter",
            sw.connections_refused, "incoming swarm connections refused at the limit")
    _metric(lines, "blobmesh_swarm_requests_expired_total", "counter", sw.requests_expired,
            "piece requests re-issued elsewhere after their deadline")
    _metric(lines, "blobmesh_swarm_protocol_errors_total", "counter", sw.protocol_errors,
            "swarm connections reset because the peer broke the protocol")
    _metric(lines, "blobmesh_swarm_corrupt_copies_total", "counter", len(sw.corrupt),
            "local copies found corrupt and quarantined")
    lines.append("# HELP blobmesh_swarm_peers_banned_total peers banned for a blob, by reason")
    lines.append("# TYPE blobmesh_swarm_peers_banned_total counter")
    for kind in BanKind:
        lines.append(f'blobmesh_swarm_peers_banned_total{{reason="{kind}"}} {sw.bans[kind]}')
    dists = node.distribution.distributions()
    _metric(lines, "blobmesh_distributions_active", "gauge",
            sum(d.state is DistributionState.ACTIVE for d in dists), "active distributions")
    _metric(lines, "blobmesh_space_peers_alive", "gauge", len(node.space.peers()),
            "live peers in the space")
    for key, value in sorted(node.space.metrics.snapshot().items()):
        name = "blobmesh_space_" + _NAME.sub("_", key) + "_total"
        _metric(lines, name, "counter", value, f"space counter {key}")
    lines.extend(node.share_metrics.prometheus_lines())
    return "\n".join(lines) + "\n"
