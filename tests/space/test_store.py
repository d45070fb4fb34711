from __future__ import annotations

import dataclasses
import sqlite3
import time
from pathlib import Path

import pytest

from blobmesh.errors import SpaceStorageError
from blobmesh.space import Limits, Metrics, peertree
from blobmesh.space.records import decode_record, sign_op, sign_record
from blobmesh.space.store import LocalAgentStore, OpStore, PeerStore, PutResult, open_db
from blobmesh.transport.identity import Identity

NOW = int(time.time() * 1000)
LIM = Limits()


def rec(ident: Identity, created: int = NOW, tombstone: bool = False, ttl: int = 60_000) -> bytes:
    return sign_record(ident, space="s", addresses=[], groups=["g"], capabilities={"gpu": True},
                       created_at=created, expires_at=created + ttl, tombstone=tombstone)


def test_peer_store_bounded_replacing_and_persistent(tmp_path: Path) -> None:
    lim, m = dataclasses.replace(LIM, max_peers=2), Metrics()
    db = open_db(tmp_path / "s.sqlite")
    store = PeerStore(db, "s", lim, m, NOW)
    a, b, c = (Identity.generate() for _ in range(3))

    def put(raw: bytes) -> PutResult:
        return store.put(decode_record(raw, space="s", now_ms=NOW, limits=lim))

    assert put(rec(a)) is PutResult.NEW
    assert put(rec(a, NOW + 1)) is PutResult.REPLACED
    assert put(rec(a)) is PutResult.STALE  # replayed older record
    assert put(rec(b)) is PutResult.NEW
    assert put(rec(c)) is PutResult.REFUSED and m["limit_peer_store"] == 1
    assert put(rec(b, NOW + 2, tombstone=True)) is PutResult.REPLACED
    assert [r.node_id for r in store.query(group="g")] == [a.node_id]
    assert store.query(capability=lambda caps: caps.get("gpu") is False) == []
    db.close()
    again = PeerStore(open_db(tmp_path / "s.sqlite"), "s", lim, m, NOW)
    assert len(again) == 2 and again.digest() == store.digest()
    assert again.expire(NOW + 120_000) and len(again) == 0


def test_op_store_bounded_queryable_and_gossip_only_after_inform(tmp_path: Path) -> None:
    lim, m = dataclasses.replace(LIM, max_ops=3), Metrics()
    db = open_db(tmp_path / "s.sqlite")
    store = OpStore(db, "s", 60_000, lim, m)
    ident = Identity.generate()
    ops = [sign_op(ident, space="s", kind="a" if i % 2 else "b", timestamp=NOW + i,
                   payload=b"%d" % i, limits=lim) for i in range(4)]
    new = store.insert(ops)
    assert len(new) == 3 and m["limit_op_store"] == 1
    assert store.insert(ops[:1]) == []  # immutable: same id, nothing new
    empty = store.digest()
    assert store.buckets() == {}
    store.mark_gossipable(o.id for o in new)
    assert store.digest() != empty
    assert [o.payload for o in store.query("a")] == [b"1"]
    assert [o.payload for o in store.query(since=NOW + 1)] == [b"1", b"2"]
    assert store.missing([ops[0].id.digest, ops[3].id.digest]) == [ops[3].id.digest]
    assert store.prune(NOW + 2) == 2 and len(store) == 1


def test_local_agent_store_remembers_creation_time(tmp_path: Path) -> None:
    ident = Identity.generate()
    db = open_db(tmp_path / "s.sqlite")
    store = LocalAgentStore(db, ident.node_id)
    assert store.last_created_at() == 0
    store.save(decode_record(rec(ident), space="s", now_ms=NOW, limits=LIM))
    assert LocalAgentStore(db, ident.node_id).last_created_at() == NOW


def full(db: sqlite3.Connection, spare_pages: int = 1) -> None:
    """The disk fills up: SQLite's page limit on this connection fails writes the same way
    (SQLITE_FULL) as a full filesystem."""
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages + spare_pages}")


def test_op_store_on_a_full_disk_stores_a_batch_whole_or_not_at_all(tmp_path: Path) -> None:
    db = open_db(tmp_path / "s.sqlite")
    store = OpStore(db, "s", 60_000, LIM, Metrics())
    ident = Identity.generate()
    ops = [sign_op(ident, space="s", kind="k", timestamp=NOW + i, payload=bytes(3000),
                   limits=LIM) for i in range(20)]
    assert store.insert(ops[:1], gossip=True) == ops[:1]
    full(db)
    with pytest.raises(SpaceStorageError, match="full"):
        store.insert(ops[1:], gossip=True)
    assert len(store) == 1 and store.missing(o.id.digest for o in ops) == \
        [o.id.digest for o in ops[1:]]  # nothing of the failed batch was kept
    assert store.last_seq == 1
    db.execute("PRAGMA max_page_count = 1073741823")  # room again
    assert store.insert(ops[1:], gossip=True) == ops[1:] and len(store) == 20
    assert [n for n, _ in store.after(0, None, 100)] == list(range(1, 21))


def test_arrival_numbers_are_not_reused_after_the_newest_op_is_pruned(tmp_path: Path) -> None:
    store = OpStore(open_db(tmp_path / "s.sqlite"), "s", 60_000, LIM, Metrics())
    ident = Identity.generate()
    new, old = (sign_op(ident, space="s", kind="k", timestamp=ts, payload=b"", limits=LIM)
                for ts in (NOW, NOW - 10_000))
    store.insert([new, old])  # the old op arrived last (e.g. gossiped late)
    assert store.prune(NOW - 5_000) == 1
    later = sign_op(ident, space="s", kind="k", timestamp=NOW + 1, payload=b"", limits=LIM)
    store.insert([later])
    assert store.after(2, frozenset({"k"}), 10) == [(3, later)]


def test_records_under_a_prefix_and_the_tree_follow_puts_and_expiry() -> None:
    store = PeerStore(open_db(":memory:"), "s", LIM, Metrics(), NOW)

    def put(ident: Identity, created: int, ttl: int = 60_000) -> None:
        store.put(decode_record(rec(ident, created, ttl=ttl), space="s", now_ms=NOW, limits=LIM))

    idents = [Identity.generate() for _ in range(40)]
    for ident in idents:
        put(ident, NOW)
    assert [r.node_id for r in store.under(1)] == sorted(i.node_id for i in idents)
    for c in peertree.children(1):
        under = store.under(c)
        assert len(under) == store.tree.count(c)
        assert all(peertree.prefix_of(r.node_id.digest, 1) == c for r in under)
    before = store.digest()
    put(idents[0], NOW + 1)
    assert store.digest() != before and store.tree.count(1) == 40
    put(Identity.generate(), NOW, ttl=10)
    assert store.tree.count(1) == 41
    store.expire(NOW + 100)
    assert len(store.under(1)) == 40 and store.tree.count(1) == 40


def test_max_peers_counts_other_nodes_only() -> None:
    lim, m = dataclasses.replace(LIM, max_peers=2), Metrics()
    me, a, b, c = (Identity.generate() for _ in range(4))
    store = PeerStore(open_db(":memory:"), "s", lim, m, NOW, me=me.node_id)

    def put(ident: Identity) -> PutResult:
        return store.put(decode_record(rec(ident), space="s", now_ms=NOW, limits=lim))

    assert [put(x) for x in (a, me, b)] == [PutResult.NEW] * 3
    assert put(c) is PutResult.REFUSED and m["limit_peer_store"] == 1 and len(store) == 3
