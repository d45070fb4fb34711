"""The swarm's node-wide settings (sans-I/O: the simulator runs real nodes' defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from blobmesh.distribution.scheduler import MAX_UPLOAD_SLOTS, UPLOAD_SLOTS, DownloadPolicy


@dataclass(slots=True)
class SwarmConfig:
    """Node-wide swarm limits (rates in bytes/s, 0 = unlimited)."""

    pipeline: int = 16  # requests in flight per peer
    # ... to a peer holding the whole blob: a request waiting in a seed's queue pins its
    # piece there while other peers could relay it by now
    seed_pipeline: int = 4
    max_peers_per_blob: int = 8
    upload_workers: int = 4  # disk reads in parallel; sends are per connection
    upload_rate: float = 0.0
    download_rate: float = 0.0
    max_connections: int = 64  # swarm connections over all blobs, in and out
    peer_retry: float = 1.0  # seconds before dialing a peer that failed again
    stall_timeout: float = 30.0
    flush_interval: float = 1.0  # make received pieces durable (and resumable) this often
    request_timeout: float = 6.0  # a connection answering none of its requests this long
    request_strikes: int = 3  # ... this many times in a row is banned for the blob
    # pieces read and queued but not yet taken by the transport, over all connections (None:
    # only each connection's outbox bounds them; the transport's windows bound the wire)
    upload_slots: int | None = UPLOAD_SLOTS
    # ... opening more, up to this many, while the node sends below its peak rate (None:
    # fixed; the simulator: 300 targets 1.48/1.44x the bound -> 1.40/1.35x, docs/sim.md)
    max_upload_slots: int | None = MAX_UPLOAD_SLOTS
    send_timeout: float = 20.0  # a peer that reads nothing we send this long is banned
    # pieces verified within this many seconds of the last ``haves`` wait for the next one
    # (at most ``announce_batch`` of them): fewer messages for a little relay latency
    announce_delay: float = 0.02
    announce_batch: int = 8
    disk_retry: float = 1.0  # seconds between checks for free space while the disk is full
    # a complete copy is rehashed before it is distributed or counted as here, unless its
    # unchanged data file verified less than this many seconds ago (pieces are verified
    # again whenever they are sent; 0: rehash every time)
    reverify_after: float = 24 * 3600.0

    def download_policy(self) -> DownloadPolicy:
        """The knobs of each download job (``blobmesh sim`` runs with the same ones)."""
        return DownloadPolicy(
            pipeline=self.pipeline, seed_pipeline=min(self.seed_pipeline, self.pipeline),
            max_peers=self.max_peers_per_blob, peer_retry=self.peer_retry,
            stall_timeout=self.stall_timeout, flush_interval=self.flush_interval,
            request_timeout=self.request_timeout, request_strikes=self.request_strikes,
            announce_delay=self.announce_delay, announce_batch=self.announce_batch)


__all__ = ["SwarmConfig"]
