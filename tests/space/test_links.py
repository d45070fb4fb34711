"""The links core: the outgoing LRU, dial backoff, the inbound gate."""

from __future__ import annotations

import dataclasses

from blobmesh.space import Limits, Metrics, PeerMeta, Timing
from blobmesh.space.links import MAX_INBOUND_STREAMS_PER_PEER, Links
from blobmesh.transport.identity import Identity

T = Timing(probe_interval=1.0, unresponsive_backoff_max=5.0)
A, B, C = (Identity.generate().node_id for _ in range(3))


def core(**limits: int) -> tuple[Links, Metrics]:
    m = Metrics()
    return Links(T, dataclasses.replace(Limits(), **limits), m), m


def test_the_least_recently_used_link_makes_room() -> None:
    links, m = core(max_links=2)
    assert links.opened(A) == [] and links.opened(B) == []
    links.used(A)
    assert links.opened(C) == [B] and m["limit_links"] == 1
    assert A in links and B not in links
    links.closed(A)
    assert links.opened(B) == []


def test_dial_backoff_doubles_up_to_the_maximum_and_resets() -> None:
    links, _ = core()
    meta = PeerMeta()
    waits = []
    for _ in range(5):
        links.dial_failed(meta, now=100.0)
        waits.append(meta.backoff_until - 100.0)
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert not Links.may_dial(meta, 104.9) and Links.may_dial(meta, 105.0)
    Links.dial_ok(meta)
    assert meta.failures == 0 and Links.may_dial(meta, 0.0) and Links.may_dial(None, 0.0)


def test_inbound_gate_bounds_streams_per_peer_and_strangers_handshaking() -> None:
    links, m = core(max_handshakes=1)
    for _ in range(MAX_INBOUND_STREAMS_PER_PEER):
        assert links.admit_stream(A, stranger=False) is None
    assert links.admit_stream(A, stranger=False) == "too many streams"
    assert links.admit_stream(B, stranger=True) is None
    assert links.admit_stream(C, stranger=True) == "busy"  # B is still handshaking
    assert links.admit_stream(C, stranger=False) is None  # members are not held up
    links.handshake_over(stranger=True)
    assert links.admit_stream(C, stranger=True) is None
    assert m["limit_inbound_streams"] == 1 and m["limit_handshakes"] == 1
    assert not links.stream_closed(C) and links.stream_closed(C) and not links.serving(C)
    assert links.serving(A)
