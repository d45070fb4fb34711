"""Prometheus text exposition of a node's counters and gauges."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from blobmesh.distribution.model import DistributionState

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
    dists = node.distribution.distributions()
    _metric(lines, "blobmesh_distributions_active", "gauge",
            sum(d.state is DistributionState.ACTIVE for d in dists), "active distributions")
    _metric(lines, "blobmesh_space_peers_alive", "gauge", len(node.space.peers()),
            "live peers in the space")
    for key, value in sorted(node.space.metrics.snapshot().items()):
        name = "blobmesh_space_" + _NAME.sub("_", key) + "_total"
        _metric(lines, name, "counter", value, f"space counter {key}")
    _admission_metrics(lines, node)
    lines.extend(node.share_metrics.prometheus_lines())
    return "\n".join(lines) + "\n"


def _admission_metrics(lines: list[str], node: Node) -> None:
    """What strangers and refused requests cost (the space's admission counters are among
    ``blobmesh_space_*``: admission_accepted, admission_refused, handshake_timeouts...)."""
    ep, tr = node.endpoint, node.transfer
    _metric(lines, "blobmesh_transport_connected_peers", "gauge", len(ep.connected_peers()),
            "peers with a usable connection")
    _metric(lines, "blobmesh_transport_connections_refused_total", "counter", ep.refused,
            "connections refused at accept by the caps (all, and not admitted)")
    _metric(lines, "blobmesh_transfer_refused_unadmitted_total", "counter",
            tr.refused_unadmitted, "transfer streams refused: peer not admitted")
    _metric(lines, "blobmesh_transfer_requests_refused_total", "counter",
            tr.requests_refused, "transfer requests refused by validation (nothing kept)")
    _metric(lines, "blobmesh_transfer_channels_pruned_total", "counter", tr.channels_pruned,
            "finished channels forgotten after the retention window")
