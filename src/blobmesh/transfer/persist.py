"""Channel records in SQLite (``HOME/transfer.sqlite``), so channels survive a process restart."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec

from blobmesh.store.layout import private_database
from blobmesh.transfer.channel import TERMINAL, ChannelRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    updated REAL NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS channels_status ON channels(status);
"""

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ChannelRecord)


def record_key(rec: ChannelRecord) -> str:
    return f"{rec.initiator}/{rec.responder}/{rec.transfer_id}"


class ChannelDB:
    """One table of msgpack-encoded :class:`ChannelRecord` rows, keyed by channel id."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        private_database(path)  # 0600, like every database of the home
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # the store's bitfield is the truth about verified data; a lost counter update is
        # recomputed from it on restart, so commits need not wait for fsync
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        private_database(path)  # its -wal and -shm files, now they exist

    def save_many(self, records: list[ChannelRecord]) -> None:
        """Write records in one transaction."""
        if not records:
            return
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO channels VALUES (?,?,?,?)",
                [(record_key(r), r.base, r.updated, _encoder.encode(r)) for r in records])

    def load_active(self) -> list[ChannelRecord]:
        """Every channel not yet completed, failed or cancelled."""
        done = tuple(s.value for s in TERMINAL)
        rows = self._db.execute(
            f"SELECT record FROM channels WHERE status NOT IN ({','.join('?' * len(done))}) "
            "ORDER BY updated", done).fetchall()
        return [_decoder.decode(r[0]) for r in rows]

    def prune(self, before: float) -> int:
        """Delete finished channels last updated before ``before``; how many were."""
        done = tuple(s.value for s in TERMINAL)
        with self._db:
            cur = self._db.execute(
                f"DELETE FROM channels WHERE status IN ({','.join('?' * len(done))}) "
                "AND updated < ?", (*done, before))
        return cur.rowcount

    def get(self, key: str) -> ChannelRecord | None:
        row = self._db.execute("SELECT record FROM channels WHERE key=?", (key,)).fetchone()
        return None if row is None else _decoder.decode(row[0])

    def close(self) -> None:
        self._db.close()
