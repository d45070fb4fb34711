"""Configuration of a space: admission, own record contents, timing and every bound."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from blobmesh.transport.identity import NodeId
from blobmesh.transport.ticket import Ticket, format_address

CapValue = bool | int | float | str
"""A typed capability value: ``gpu=true`` is a bool, ``mem_gb=64`` an int, ``arch=arm64`` a str."""


@dataclass(frozen=True, slots=True)
class Seed:
    """A peer to contact first: its node id and the addresses it listens on (from a ticket)."""

    node_id: NodeId
    addresses: tuple[str, ...] = ()

    @classmethod
    def from_ticket(cls, ticket: Ticket) -> Seed:
        return cls(ticket.node_id, tuple(format_address(a) for a in ticket.addrs))


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound the space enforces; hitting one increments a ``limit_*`` metric."""

    max_message_bytes: int = 512 * 1024   # checked before any decoding
    max_record_bytes: int = 4096
    max_op_bytes: int = 64 * 1024         # a whole signed op (payload + envelope)
    max_notify_bytes: int = 64 * 1024
    max_elements: int = 1024              # records / ops / ids / buckets in one message
    max_addresses: int = 16
    max_groups: int = 32
    max_capabilities: int = 64
    max_string: int = 256                 # one address, group, capability key or value
    max_peers: int = 10_000
    max_ops: int = 200_000
    max_links: int = 512                  # open outgoing links (LRU-closed beyond)
    max_seeds: int = 256                  # seeds not yet known as peers (config, LAN)
    max_pushes: int = 4096                # background pushes in flight (beyond: left to gossip)
    max_inbound_per_link: int = 16        # requests served concurrently per peer link
    max_handshakes: int = 64              # inbound handshakes in progress (strangers included)
    rejected_ops: int = 4096              # rejected op ids not fetched again for a while
    fetch_queue: int = 20_000             # op ids waiting to be fetched
    fetch_batch: int = 256                # ids per fetch request
    fetch_attempts: int = 5
    max_gossip_sessions: int = 64         # concurrent inbound gossip sessions
    gossip_id_pages: int = 64             # id pages one session may walk
    ops_per_second: float = 2000.0        # per-peer inbound op rate (token bucket)
    ops_burst: int = 4096
    requests_per_second: float = 200.0    # per-peer inbound request rate
    requests_burst: int = 400
    subscriber_queue: int = 4096          # ops buffered per subscriber before it is dropped
    max_clock_skew_ms: int = 120_000      # records/ops dated further in the future are refused
    max_record_ttl_ms: int = 7 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Timing:
    """Periods and timeouts, in seconds."""

    gossip_interval: float = 1.0
    gossip_fanout: int = 1                # peers per anti-entropy round
    probe_interval: float = 1.0           # SWIM protocol period
    probe_timeout: float = 0.5            # direct ack deadline (after connecting)
    indirect_timeout: float = 1.0         # indirect (ping-req) deadline after the direct one
    indirect_probes: int = 3              # k helpers for ping-req
    suspicion_timeout: float = 6.0        # a last ping after ping-req failed waits this long
    request_timeout: float = 3.0
    handshake_timeout: float = 3.0        # a peer that has not proved the secret by then is cut
    rejected_op_ttl: float = 30.0         # a rejected op id is not fetched again for this long
    record_ttl: float = 6 * 3600.0        # own record validity; every re-sign reaches every node
    republish_margin: float = 0.5         # re-sign after this fraction of the ttl
    maintenance_interval: float = 2.0
    fetch_retry_base: float = 0.2
    fetch_retry_max: float = 10.0
    unresponsive_backoff_max: float = 5.0  # re-probe period of unresponsive peers, at most
    op_bucket_seconds: int = 3600         # time-bucket width of op summaries
    op_retention: float = 30 * 24 * 3600.0  # older ops are pruned and not accepted
    publish_fanout: int = 64              # peers a new op/record is pushed to at once
    relay_fanout: int = 1                 # of those, how many forward it once to their peers
    bootstrap_interval: float = 30.0


@dataclass(frozen=True, slots=True)
class SpaceConfig:
    """What a node needs to take part in one space.

    ``secret`` and/or ``allowlist`` form the admission rule: a peer must prove the secret (HMAC
    bound to both node ids and fresh nonces, the dialer first) and, with an allowlist, be on
    it.  No secret means an open space: anyone who knows its name may join.
    """

    name: str = "default"
    secret: bytes | None = None
    allowlist: frozenset[NodeId] | None = None
    addresses: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    capabilities: Mapping[str, CapValue] = field(default_factory=dict)
    seeds: Sequence[Seed] = ()
    bootstrap_urls: Sequence[str] = ()
    mdns: bool = False
    timing: Timing = field(default_factory=Timing)
    limits: Limits = field(default_factory=Limits)
