"""Prometheus exposition of a node's counters and gauges, produced with ``prometheus_client``
(HELP and TYPE on every family).

Per-distribution series are bounded: the :data:`MAX_DISTRIBUTIONS` newest distributions
(active ones first) get series, and their targets at most :data:`MAX_TARGET_SERIES` in all.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from blobmesh import __version__
from blobmesh.distribution.model import DistributionState, TargetState
from blobmesh.distribution.swarm import BanKind
from blobmesh.store import BlobInfo
from blobmesh.tasks import failure_counts

if TYPE_CHECKING:
    from blobmesh.node.daemon import Node

CONTENT_TYPE = CONTENT_TYPE_LATEST
MAX_DISTRIBUTIONS = 20
MAX_TARGET_SERIES = 200
MAX_TASK_SERIES = 50

_SPACE_HELP = {
    "messages_sent": "space protocol messages sent",
    "bytes_sent": "space protocol bytes sent",
    "bytes_received": "space protocol bytes received",
    "records_stale": "peer records ignored as older than the one held",
    "records_rejected": "peer records that failed verification",
    "records_republished": "times this node re-signed its own record",
    "peers_unresponsive": "times a peer was marked unresponsive by failure detection",
    "peers_left": "peers that left the space (tombstone received)",
    "ops_rejected": "ops that failed verification or validation",
    "ops_received": "new ops received from peers",
    "ops_published": "ops this node published",
    "notify_unhandled": "notifications received with no handler",
    "notify_received": "notifications received",
    "malformed_messages": "undecodable space messages",
    "loop_errors": "failed rounds of the space's background loops",
    "lan_malformed": "malformed LAN announcements",
    "lan_discovered": "peers discovered on the LAN",
    "gossip_rounds": "anti-entropy rounds started",
    "gossip_refused": "gossip rounds a peer refused (busy or error)",
    "gossip_failures": "gossip rounds that failed (unreachable peer, timeout)",
    "gossip_bytes": "bytes of gossip rounds this node started, both directions",
    "gossip_bad_session": "gossip requests for an unknown session",
    "fetch_failures": "op fetches that failed",
    "fetch_abandoned": "op ids given up after every attempt",
    "bootstrap_failures": "failed requests to bootstrap servers",
    "admission_refused": "handshakes refused by admission (secret, allowlist)",
    "admission_accepted": "handshakes that admitted a peer (either direction)",
    "handshake_timeouts": "inbound handshakes cut for taking too long",
    "ops_rejected_non_member": "ops refused because their author is not a member",
}

_SHARE_HELP = {
    "shares": ("publishes_total", "blobs published into share directories"),
    "share_failures": ("publish_failures_total", "failed publishes into share directories"),
    "unshares": ("removals_total", "blobs or resource ids removed from share directories"),
    "shared_bytes": ("published_bytes_total", "bytes published into share directories"),
    "share_seconds": ("publish_seconds_total", "seconds spent publishing"),
    "loads": ("loads_total", "blob loads from share URLs"),
    "load_failures": ("load_failures_total", "blob loads from share URLs that failed"),
    "deadlines_exceeded": ("load_deadlines_exceeded_total", "loads stopped by their deadline"),
    "tries": ("load_tries_total", "URL attempts made by loads"),
    "try_failures": ("load_try_failures_total", "URL attempts that failed"),
    "loaded_bytes": ("loaded_bytes_total", "verified bytes loaded from share URLs"),
    "load_seconds": ("load_seconds_total", "seconds spent loading"),
}


def _gauge(name: str, help_text: str, value: float, **labels: str) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, help_text, labels=list(labels))
    g.add_metric(list(labels.values()), value)
    return g


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=value)


class NodeCollector(Collector):
    """Reads the node's state at scrape time."""

    def __init__(self, node: Node, blobs: list[BlobInfo]) -> None:
        self.node = node
        self.blobs = blobs  # read off the event loop by the caller (store.aio)

    def collect(self) -> Iterator[Metric]:
        node = self.node
        yield _gauge("blobmesh_build_info", "blobmesh version and Python of this process", 1,
                     version=__version__, python=platform.python_version())
        yield _gauge("blobmesh_node_info", "node identity", 1,
                     node=str(node.identity.node_id), space=node.config.space)
        yield _gauge("blobmesh_node_start_time_seconds", "when the node started (Unix time)",
                     node.started_at)
        failures = CounterMetricFamily(
            "blobmesh_task_failures",
            f"background tasks that failed, by task (the {MAX_TASK_SERIES} most failing)",
            labels=["task"])
        counts = sorted(failure_counts().items(), key=lambda kv: (-kv[1], kv[0]))
        for task, n in counts[:MAX_TASK_SERIES]:
            failures.add_metric([task], n)
        yield failures
        yield _counter("blobmesh_node_unhandled_errors",
                       "errors no task owner retrieved (bugs: see the node's log)",
                       node.unhandled_errors)
        yield from self._store()
        yield from self._swarm()
        yield from self._space()
        yield from self._admission()
        yield from self._distributions()
        yield from self._shares()

    def _store(self) -> Iterator[Metric]:
        blobs = self.blobs
        yield _gauge("blobmesh_store_blobs", "complete blobs in the store",
                     sum(b.complete for b in blobs))
        yield _gauge("blobmesh_store_partial_blobs", "partial blobs in the store",
                     sum(not b.complete for b in blobs))
        yield _gauge("blobmesh_store_bytes", "bytes of verified blob data held",
                     sum(b.bytes_present for b in blobs))

    def _swarm(self) -> Iterator[Metric]:
        sw = self.node.swarm
        yield _counter("blobmesh_swarm_uploaded_bytes", "piece bytes sent to peers",
                       sw.bytes_uploaded)
        yield _counter("blobmesh_swarm_downloaded_bytes",
                       "verified piece bytes received from peers", sw.bytes_downloaded)
        yield _counter("blobmesh_swarm_reused_bytes", "piece bytes copied from identical "
                       "pieces of local blobs instead of fetched", sw.bytes_reused)
        yield _counter("blobmesh_swarm_pieces_rejected",
                       "pieces that failed verification (their senders were banned)",
                       sw.pieces_rejected)
        yield _gauge("blobmesh_swarm_connections", "open swarm connections", sw.connections)
        yield _counter("blobmesh_swarm_connections_refused",
                       "incoming swarm connections refused at the limit",
                       sw.connections_refused)
        yield _counter("blobmesh_swarm_requests_expired",
                       "piece requests re-issued elsewhere after their deadline",
                       sw.requests_expired)
        yield _counter("blobmesh_swarm_have_messages",
                       "haves and have-alls sent to peers", sw.have_messages)
        yield _counter("blobmesh_swarm_pieces_announced",
                       "pieces named in haves sent (only to peers that lack them, and to "
                       "their uploaders as acknowledgements)", sw.pieces_announced)
        yield _counter("blobmesh_swarm_protocol_errors",
                       "swarm connections reset because the peer broke the protocol",
                       sw.protocol_errors)
        yield _counter("blobmesh_swarm_corrupt_copies",
                       "local copies found corrupt and quarantined", len(sw.corrupt))
        bans = CounterMetricFamily("blobmesh_swarm_peers_banned",
                                   "peers banned for a blob, by reason", labels=["reason"])
        for kind in BanKind:
            bans.add_metric([str(kind)], sw.bans[kind])
        yield bans

    def _space(self) -> Iterator[Metric]:
        space = self.node.space
        yield _gauge("blobmesh_space_peers_alive", "live peers in the space",
                     len(space.peers()))
        limits = CounterMetricFamily("blobmesh_space_limit_hits",
                                     "times the space hit one of its bounds", labels=["limit"])
        for key, value in sorted(space.metrics.snapshot().items()):
            if key.startswith("limit_"):
                limits.add_metric([key.removeprefix("limit_")], value)
            else:
                help_text = _SPACE_HELP.get(key, "space counter " + key.replace("_", " "))
                yield _counter("blobmesh_space_" + key, help_text, value)
        yield limits

    def _admission(self) -> Iterator[Metric]:
        """What strangers and refused requests cost (the space's own admission counters are
        ``blobmesh_space_admission_*``, ``handshake_timeouts``, ``limit_hits{handshakes}``)."""
        ep, tr = self.node.endpoint, self.node.transfer
        yield _gauge("blobmesh_transport_connected_peers", "peers with a usable connection",
                     len(ep.connected_peers()))
        yield _counter("blobmesh_transport_connections_refused",
                       "connections refused at accept by the caps (all, and not admitted)",
                       ep.refused)
        yield _counter("blobmesh_transfer_refused_unadmitted",
                       "transfer streams refused: peer not admitted", tr.refused_unadmitted)
        yield _counter("blobmesh_transfer_requests_refused",
                       "transfer requests refused by validation (nothing kept)",
                       tr.requests_refused)
        yield _counter("blobmesh_transfer_channels_pruned",
                       "finished channels forgotten after the retention window",
                       tr.channels_pruned)

    def _distributions(self) -> Iterator[Metric]:
        dists = self.node.distribution.distributions()
        by_state = GaugeMetricFamily("blobmesh_distributions",
                                     "distributions known here, by state", labels=["state"])
        for state in DistributionState:
            by_state.add_metric([str(state)], sum(d.state is state for d in dists))
        yield by_state
        yield _gauge("blobmesh_distributions_active", "active distributions",
                     sum(d.state is DistributionState.ACTIVE for d in dists))
        shown = sorted(dists, key=lambda d: (d.done, -d.started))[:MAX_DISTRIBUTIONS]
        targets = GaugeMetricFamily(
            "blobmesh_distribution_targets",
            f"targets by state, for the {MAX_DISTRIBUTIONS} newest distributions",
            labels=["handle", "state"])
        done = GaugeMetricFamily("blobmesh_distribution_bytes_done",
                                 "bytes the targets of a distribution hold", labels=["handle"])
        total = GaugeMetricFamily("blobmesh_distribution_bytes_total",
                                  "blob size times targets", labels=["handle"])
        t_bytes = GaugeMetricFamily(
            "blobmesh_distribution_target_bytes_done",
            f"bytes one target holds (at most {MAX_TARGET_SERIES} series)",
            labels=["handle", "target", "state"])
        budget = MAX_TARGET_SERIES
        for d in shown:
            h = str(d.handle)
            for ts in TargetState:
                targets.add_metric([h, str(ts)], d.count(ts))
            done.add_metric([h], d.bytes_done)
            total.add_metric([h], d.bytes_total)
            for t in d.targets[:budget]:
                t_bytes.add_metric([h, str(t.node), str(t.state)], t.bytes_done)
            budget -= min(budget, len(d.targets))
        yield from (targets, done, total, t_bytes)

    def _shares(self) -> Iterator[Metric]:
        sm = self.node.share_metrics
        for f in dataclasses.fields(sm):
            if f.name.startswith("_"):
                continue
            suffix, help_text = _SHARE_HELP.get(f.name, (f.name, "share counter " + f.name))
            yield _counter("blobmesh_shares_" + suffix.removesuffix("_total"), help_text,
                           getattr(sm, f.name))


def render_metrics(node: Node, blobs: list[BlobInfo]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node, blobs))
    return generate_latest(registry).decode()
