from __future__ import annotations

import dataclasses

from blobmesh.space import Limits, Metrics
from blobmesh.space.fetch import FetchQueue
from blobmesh.transport.identity import Identity

A, B = Identity.generate().node_id, Identity.generate().node_id


def queue(**kw: int) -> tuple[FetchQueue, Metrics]:
    m = Metrics()
    lim = dataclasses.replace(Limits(), **kw)
    return FetchQueue(lim, retry_base=1.0, retry_max=4.0, metrics=m), m


def ids(n: int, start: int = 0) -> list[bytes]:
    return [i.to_bytes(32, "big") for i in range(start, start + n)]


def test_no_duplicate_requests_in_flight() -> None:
    q, _ = queue()
    q.add(ids(3), A)
    q.add(ids(3), B)  # same ids, second source
    first = q.due(0.0)
    assert first == [(A, ids(3))]
    assert q.due(0.0) == []  # in flight to A; A is busy; nothing goes to B
    q.received(A, ids(3))
    assert len(q) == 0 and q.due(0.0) == []


def test_failure_backs_off_and_rotates_source() -> None:
    q, m = queue()
    q.add(ids(1), A)
    q.add(ids(1), B)
    (peer, got), = q.due(0.0)
    q.failed(peer, got, now=0.0)
    assert q.due(0.5) == []  # backing off
    assert q.due(1.0) == [(B, ids(1))]
    assert m["fetch_failures"] == 1


def test_full_queue_refuses_and_counts() -> None:
    q, m = queue(fetch_queue=5)
    assert q.add(ids(8), A) == 5
    assert m["limit_fetch_queue"] == 3 and len(q) == 5


def test_gives_up_after_attempts_or_sources_and_counts() -> None:
    q, m = queue(fetch_attempts=2)
    q.add(ids(1), A)
    for t in (0.0, 10.0):
        (peer, got), = q.due(t)
        q.failed(peer, got, now=t)
    assert len(q) == 0 and m["fetch_abandoned"] == 1
    q.add(ids(1, 5), A)
    (peer, got), = q.due(20.0)
    q.not_found(peer, got)
    assert len(q) == 0 and m["fetch_abandoned"] == 2


def test_batches_are_bounded() -> None:
    q, _ = queue(fetch_batch=4)
    q.add(ids(10), A)
    (_, batch), = q.due(0.0)
    assert len(batch) == 4


def test_release_asks_again_without_penalty() -> None:
    q, m = queue()
    q.add(ids(2), A)
    (peer, got), = q.due(0.0)
    q.received(peer, got[:1])
    q.release(peer, got[1:])
    assert q.due(0.0) == [(A, got[1:])] and m["fetch_failures"] == 0


def test_next_due_follows_every_change() -> None:
    q, _ = queue()
    assert q.next_due() is None
    q.add(ids(2), A)
    assert q.next_due() == 0.0
    (_, got), = q.due(0.0)
    assert q.next_due() is None  # all in flight
    q.failed(A, got[:1], now=0.0)  # A idle again: the failed id waits out its backoff
    assert q.next_due() == 1.0
    q.add(ids(1, 5), B)
    assert q.next_due() == 0.0
    q.received(B, ids(1, 5))
    q.not_found(A, got[:1])
    assert q.next_due() is None and len(q) == 1
