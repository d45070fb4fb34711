"""The space's stores, persisted in one SQLite file: peers, peer meta, local agent, ops.

Peer records and peer meta are few (bounded by ``max_peers``) and read constantly, so they live
in memory and are written through (meta is flushed periodically).  Ops live in SQLite only.
Every store is bounded; a refused insert increments a ``limit_*`` metric and is reported to
the caller, never dropped silently.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import blake3

from blobmesh.errors import InvalidRecordError, SpaceStorageError
from blobmesh.space.config import CapValue, Limits
from blobmesh.space.membership import PeerMeta
from blobmesh.space.metrics import Metrics
from blobmesh.space.peertree import PeerTree, bounds
from blobmesh.space.records import Op, OpId, PeerRecord, decode_op, decode_record
from blobmesh.store.layout import private_database
from blobmesh.transport.identity import NodeId

_SCHEMA = """
CREATE TABLE IF NOT EXISTS peers (
    node BLOB PRIMARY KEY, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    raw BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS peer_meta (
    node BLOB PRIMARY KEY, last_seen REAL NOT NULL, failures INTEGER NOT NULL,
    backoff_until REAL NOT NULL, unresponsive INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS local_agent (
    node BLOB PRIMARY KEY, created_at INTEGER NOT NULL, raw BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ops (
    id BLOB PRIMARY KEY, kind TEXT NOT NULL, author BLOB NOT NULL, ts INTEGER NOT NULL,
    bucket INTEGER NOT NULL, gossip INTEGER NOT NULL DEFAULT 0, raw BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS ops_kind_ts ON ops (kind, ts);
CREATE INDEX IF NOT EXISTS ops_ts ON ops (ts);
CREATE INDEX IF NOT EXISTS ops_bucket ON ops (gossip, bucket, id);
CREATE INDEX IF NOT EXISTS ops_author ON ops (author, gossip);
"""


def open_db(path: Path | str) -> sqlite3.Connection:
    """Open (creating) the space database; ``":memory:"`` for tests."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        private_database(path)  # 0600, like every database of the home
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # metadata is re-gossiped after a crash, so losing the last commits is acceptable
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(_SCHEMA)
    private_database(path)  # its -wal and -shm files, now they exist
    return db


@contextlib.contextmanager
def _write(db: sqlite3.Connection) -> Iterator[None]:
    """One transaction, all or nothing; a failed write (disk full, I/O error) is a
    :class:`SpaceStorageError`.  The connection autocommits, so a batch needs its own BEGIN."""
    try:
        db.execute("BEGIN")
        with db:
            yield
    except sqlite3.OperationalError as exc:
        raise SpaceStorageError(f"space database: {exc}") from exc


class PutResult(enum.Enum):
    NEW = "new"
    REPLACED = "replaced"
    STALE = "stale"      # we hold the same or a newer record
    REFUSED = "refused"  # the store is full


class PeerStore:
    """Latest valid record per node, tombstones included (kept until expiry to block replays).

    Holds at most ``max_peers`` records of other nodes, and ``me``'s besides.
    """

    def __init__(self, db: sqlite3.Connection, space: str, limits: Limits, metrics: Metrics,
                 now_ms: int, *, me: NodeId | None = None) -> None:
        self._db = db
        self._limits = limits
        self._metrics = metrics
        self._me = me
        self.version = 0  # changes whenever the records held do
        self._records: dict[NodeId, PeerRecord] = {}
        self._tree = PeerTree()
        self._sorted: list[bytes] = []  # node ids, for the records under a prefix
        for (raw,) in db.execute("SELECT raw FROM peers"):
            try:
                rec = decode_record(raw, space=space, now_ms=now_ms, limits=limits)
            except InvalidRecordError:
                continue  # expired while we were down (or limits tightened)
            self._records[rec.node_id] = rec
            self._tree.toggle(rec.node_id.digest, rec.created_at)
        self._sorted = sorted(n.digest for n in self._records)
        db.execute("DELETE FROM peers WHERE expires_at <= ?", (now_ms,))

    def put(self, rec: PeerRecord) -> PutResult:
        """Store ``rec`` (already verified) if it is newer than what we hold."""
        old = self._records.get(rec.node_id)
        if old is not None and not rec.newer_than(old):
            return PutResult.STALE
        if (old is None and rec.node_id != self._me
                and len(self._records) - (self._me in self._records) >= self._limits.max_peers):
            self._metrics.limit("peer_store")
            return PutResult.REFUSED
        with _write(self._db):  # first: a record we could not persist is not held either
            self._db.execute("INSERT OR REPLACE INTO peers VALUES (?, ?, ?, ?)",
                             (rec.node_id.digest, rec.created_at, rec.expires_at, rec.raw))
        self._records[rec.node_id] = rec
        self.version += 1
        node = rec.node_id.digest
        if old is None:
            bisect.insort(self._sorted, node)
        else:
            self._tree.toggle(node, old.created_at, -1)
        self._tree.toggle(node, rec.created_at)
        return PutResult.NEW if old is None else PutResult.REPLACED

    def get(self, node: NodeId) -> PeerRecord | None:
        return self._records.get(node)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[PeerRecord]:
        return iter(list(self._records.values()))

    def expire(self, now_ms: int) -> list[NodeId]:
        """Forget expired records (tombstones included); returns their node ids."""
        gone = [n for n, r in self._records.items() if r.expires_at <= now_ms]
        for n in gone:
            self._tree.toggle(n.digest, self._records.pop(n).created_at, -1)
        if gone:
            self.version += 1
            dropped = {n.digest for n in gone}
            self._sorted = [n for n in self._sorted if n not in dropped]
            # left in the file if this fails: expired rows are dropped again when it is opened
            with _write(self._db):
                self._db.executemany("DELETE FROM peers WHERE node = ?",
                                     [(n.digest,) for n in gone])
        return gone

    @property
    def tree(self) -> PeerTree:
        """Counts and digests of the records' ``(node, created_at)`` by node-id prefix."""
        return self._tree

    def digest(self) -> bytes:
        """Of every record's ``(node, created_at)``: equal on two nodes holding the same."""
        return self._tree.root()

    def under(self, prefix: int) -> list[PeerRecord]:
        """The records whose node id starts with ``prefix`` (see :mod:`.peertree`), by id."""
        lo, hi = bounds(prefix)
        i = bisect.bisect_left(self._sorted, lo)
        j = len(self._sorted) if hi is None else bisect.bisect_left(self._sorted, hi)
        return [self._records[NodeId(n)] for n in self._sorted[i:j]]

    def query(self, *, group: str | None = None,
              capability: Callable[[Mapping[str, CapValue]], bool] | None = None,
              include: Callable[[NodeId], bool] | None = None) -> list[PeerRecord]:
        """Live (non-tombstone) records matching every given filter, sorted by node id."""
        out = [r for r in self._records.values()
               if not r.tombstone
               and (group is None or group in r.groups)
               and (capability is None or capability(r.capabilities))
               and (include is None or include(r.node_id))]
        # by the digest: the same order as NodeId's, without a Python-level comparison per
        # pair (8x faster; gossip reads the alive peers several times a second)
        return sorted(out, key=lambda r: r.node_id.digest)


class PeerMetaStore:
    """Liveness bookkeeping per peer, in memory, flushed to SQLite by :meth:`flush`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._meta: dict[NodeId, PeerMeta] = {}
        for node, seen, fails, backoff, unresp in db.execute("SELECT * FROM peer_meta"):
            self._meta[NodeId(node)] = PeerMeta(seen, fails, backoff, bool(unresp))

    def get(self, node: NodeId) -> PeerMeta:
        meta = self._meta.get(node)
        if meta is None:
            meta = self._meta[node] = PeerMeta()
        return meta

    def peek(self, node: NodeId) -> PeerMeta | None:
        return self._meta.get(node)

    def forget(self, nodes: Iterable[NodeId]) -> None:
        for n in nodes:
            self._meta.pop(n, None)

    def retain(self, keep: Callable[[NodeId], bool]) -> None:
        """Drop meta of peers ``keep`` rejects (bounds this store by the peer store)."""
        self.forget([n for n in self._meta if not keep(n)])

    def flush(self) -> None:
        with _write(self._db):
            self._db.execute("DELETE FROM peer_meta")
            self._db.executemany(
                "INSERT INTO peer_meta VALUES (?, ?, ?, ?, ?)",
                [(n.digest, m.last_seen, m.failures, m.backoff_until, int(m.unresponsive))
                 for n, m in self._meta.items()])


class LocalAgentStore:
    """Our own latest signed record, so a restart re-signs with a later ``created_at``."""

    def __init__(self, db: sqlite3.Connection, node: NodeId) -> None:
        self._db = db
        self._node = node

    def last_created_at(self) -> int:
        row = self._db.execute("SELECT created_at FROM local_agent WHERE node = ?",
                               (self._node.digest,)).fetchone()
        return int(row[0]) if row else 0

    def save(self, rec: PeerRecord) -> None:
        with _write(self._db):
            self._db.execute("INSERT OR REPLACE INTO local_agent VALUES (?, ?, ?)",
                             (self._node.digest, rec.created_at, rec.raw))


class OpStore:
    """Immutable, content-addressed ops; only those marked gossipable enter summaries."""

    def __init__(self, db: sqlite3.Connection, space: str, bucket_ms: int, limits: Limits,
                 metrics: Metrics) -> None:
        self._db = db
        self._space = space
        self._bucket_ms = bucket_ms
        self._limits = limits
        self._metrics = metrics
        self._buckets: dict[int, tuple[int, bytes]] | None = None
        self._digest: bytes | None = None
        self._count = int(db.execute("SELECT COUNT(*) FROM ops").fetchone()[0])
        # the rowid is the order of arrival (a subscriber's cursor); assigned here so that
        # pruning the newest row never lets the next op reuse its number
        self._seq = int(db.execute("SELECT COALESCE(MAX(rowid), 0) FROM ops").fetchone()[0])

    def bucket_of(self, ts: int) -> int:
        return ts // self._bucket_ms

    def __len__(self) -> int:
        return self._count

    def insert(self, ops: Iterable[Op], *, gossip: bool = False) -> list[Op]:
        """Store new ops (gossipable at once only if ``gossip``); returns those that were new.

        Stops at ``max_ops`` (``limit_op_store``): the rest stay unstored and will be offered
        again by gossip once room is made.  All or none: :class:`SpaceStorageError` if the
        batch could not be written.
        """
        new: list[Op] = []
        seq = self._seq
        with _write(self._db):
            for op in ops:
                if self._count + len(new) >= self._limits.max_ops:
                    self._metrics.limit("op_store")
                    break
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO ops (rowid, id, kind, author, ts, bucket, gossip, raw)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (seq + 1, op.id.digest, op.kind, op.author.digest, op.timestamp,
                     self.bucket_of(op.timestamp), int(gossip), op.raw))
                if cur.rowcount:
                    seq += 1
                    new.append(op)
        self._seq = seq
        self._count += len(new)
        if new and gossip:
            self._buckets = None
            self._digest = None
        return new

    def seqs(self, ids: Iterable[bytes]) -> dict[bytes, int]:
        """The arrival number of each stored op among ``ids``."""
        out: dict[bytes, int] = {}
        for chunk in _chunks(list(ids), 500):
            q = f"SELECT id, rowid FROM ops WHERE id IN ({','.join('?' * len(chunk))})"
            out.update((bytes(i), int(n)) for i, n in self._db.execute(q, chunk))
        return out

    @property
    def last_seq(self) -> int:
        """The arrival number of the newest op stored (0: none yet)."""
        return self._seq

    def after(self, seq: int, kinds: frozenset[str] | None, limit: int) -> list[tuple[int, Op]]:
        """Up to ``limit`` stored ops (of ``kinds``) that arrived after ``seq``, in arrival
        order, each with its arrival number."""
        if kinds is None:
            rows = self._db.execute(
                "SELECT rowid, raw FROM ops WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (seq, limit))
        else:
            rows = self._db.execute(
                f"SELECT rowid, raw FROM ops WHERE rowid > ? AND kind IN "
                f"({','.join('?' * len(kinds))}) ORDER BY rowid LIMIT ?",
                (seq, *sorted(kinds), limit))
        return [(int(n), self._decode(r)) for n, r in rows]

    def mark_gossipable(self, ids: Iterable[OpId]) -> None:
        """Let stored ops enter gossip summaries (``inform_ops_stored``)."""
        with _write(self._db):
            self._db.executemany("UPDATE ops SET gossip = 1 WHERE id = ?",
                                 [(i.digest,) for i in ids])
        self._buckets = None
        self._digest = None

    def set_author_gossipable(self, author: bytes, gossipable: bool) -> int:
        """Let an author's stored ops in or out of gossip summaries (it joined or left, so
        every node's summaries agree on who counts); how many changed."""
        flag = int(gossipable)
        with _write(self._db):
            n = self._db.execute("UPDATE ops SET gossip = ? WHERE author = ? AND gossip = ?",
                                 (flag, author, 1 - flag)).rowcount
        if n:
            self._buckets = None
            self._digest = None
        return n

    def missing(self, ids: Iterable[bytes]) -> list[bytes]:
        """The ids of ``ids`` we do not hold."""
        ids = list(ids)
        have: set[bytes] = set()
        for chunk in _chunks(ids, 500):
            q = f"SELECT id FROM ops WHERE id IN ({','.join('?' * len(chunk))})"
            have.update(r[0] for r in self._db.execute(q, chunk))
        return [i for i in ids if i not in have]

    def get_raw(self, ids: Iterable[bytes]) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for chunk in _chunks(list(ids), 500):
            q = f"SELECT id, raw FROM ops WHERE id IN ({','.join('?' * len(chunk))})"
            out.update((bytes(i), bytes(r)) for i, r in self._db.execute(q, chunk))
        return out

    def query(self, kind: str | None = None, since: int = 0, limit: int = 1000) -> list[Op]:
        """Ops (of ``kind``) with timestamp >= ``since`` ms, oldest first."""
        if kind is None:
            rows = self._db.execute("SELECT raw FROM ops WHERE ts >= ? ORDER BY ts, id LIMIT ?",
                                    (since, limit))
        else:
            rows = self._db.execute(
                "SELECT raw FROM ops WHERE kind = ? AND ts >= ? ORDER BY ts, id LIMIT ?",
                (kind, since, limit))
        return [self._decode(r[0]) for r in rows]

    def _decode(self, raw: bytes) -> Op:
        # already verified when stored; decoding again is cheap and keeps one code path
        return decode_op(raw, space=self._space, now_ms=1 << 62, limits=self._limits)

    def buckets(self) -> dict[int, tuple[int, bytes]]:
        """bucket -> (count, digest of its sorted ids), gossipable ops only; cached."""
        if self._buckets is None:
            acc: dict[int, tuple[int, blake3.blake3]] = {}
            for bucket, op_id in self._db.execute(
                    "SELECT bucket, id FROM ops WHERE gossip = 1 ORDER BY bucket, id"):
                n, h = acc.get(bucket) or (0, blake3.blake3())
                h.update(op_id)
                acc[bucket] = (n + 1, h)
            self._buckets = {b: (n, h.digest()) for b, (n, h) in acc.items()}
        return self._buckets

    def digest(self) -> bytes:
        if self._digest is None:
            h = blake3.blake3()
            for b, (n, d) in sorted(self.buckets().items()):
                h.update(b.to_bytes(8, "big", signed=True) + n.to_bytes(8, "big") + d)
            self._digest = h.digest()
        return self._digest

    def ids_in(self, buckets: Iterable[int], after: bytes, limit: int) -> list[tuple[int, bytes]]:
        """Gossipable (bucket, id) pairs in ``buckets`` with id > ``after``, by id."""
        bl = sorted(set(buckets))
        out: list[tuple[int, bytes]] = []
        for chunk in _chunks(bl, 500):
            q = (f"SELECT bucket, id FROM ops WHERE gossip = 1 AND id > ? AND bucket IN "
                 f"({','.join('?' * len(chunk))}) ORDER BY id LIMIT ?")
            out.extend((b, bytes(i)) for b, i in self._db.execute(q, [after, *chunk, limit]))
        out.sort(key=lambda p: p[1])
        return out[:limit]

    def prune(self, before_ms: int) -> int:
        """Delete ops older than ``before_ms`` (retention); returns how many."""
        with _write(self._db):
            n = self._db.execute("DELETE FROM ops WHERE ts < ?", (before_ms,)).rowcount
        if n:
            self._count -= n
            self._buckets = None
            self._digest = None
        return n


_T = TypeVar("_T")


def _chunks(items: list[_T], n: int) -> Iterator[list[_T]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]
