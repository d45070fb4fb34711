"""The home's layout on disk: who may read it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from blobmesh.hashing import BlobId, PieceLayer, hash_stream
from blobmesh.store import LeaseId, Store
from blobmesh.store.piece_index import PieceIndex


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_home_is_private(home: Path) -> None:
    home.mkdir(mode=0o755)
    home.chmod(0o755)  # an existing home, readable by all, is made private
    with Store(home) as store:
        info = store.add_stream([b"secret weights"])  # streamed: it has a .pieces file
        layer: PieceLayer = hash_stream([b"x" * 40000], 16384)[1]
        store.begin_partial(layer, LeaseId.new("rx")).close()
        for d in (home, store.layout.blobs, store.layout.tmp, store.layout.trash,
                  store.layout.quarantine, store.layout.data_path(info.blob_id).parent):
            assert _mode(d) == 0o700, d
        files = [store.layout.data_path(info.blob_id), store.layout.pieces_path(info.blob_id),
                 store.layout.data_path(layer.blob_id), store.layout.pieces_path(layer.blob_id),
                 store.layout.db, Path(f"{store.layout.db}-wal")]
        for f in files:
            assert _mode(f) == 0o600, f



def _check_every_database(home: Path) -> None:
    """Open (creating) each SQLite database a node keeps in its home and, while they are
    open (their -wal and -shm files exist), check that only the owner may read them."""
    from blobmesh.space.store import open_db
    from blobmesh.transfer.persist import ChannelDB

    with Store(home) as store:
        store.add_bytes(os.urandom(100_000))  # a write: the WAL files exist
        index = PieceIndex(store)
        space = open_db(home / "space.sqlite")
        channels = ChannelDB(home / "transfer.sqlite")
        try:
            index.sync()
            space.execute("SELECT count(*) FROM ops").fetchone()
            channels.save_many([])
            for db in DATABASES:
                for f in (home / db, home / f"{db}-wal", home / f"{db}-shm"):
                    assert f.exists() and _mode(f) == 0o600, (f, oct(_mode(f)))
        finally:
            channels.close()
            space.close()
            index.close()


DATABASES = ("store.sqlite", "pieces.sqlite", "space.sqlite", "transfer.sqlite")


def test_every_database_of_the_home_is_private(home: Path) -> None:
    old = os.umask(0o022)  # what a service gets by default: new files 0644
    try:
        _check_every_database(home)  # before: space, transfer and pieces.sqlite were 0644
        # a home from before the rule: its databases readable by all are made private
        for db in DATABASES:
            for f in (home / db, home / f"{db}-wal", home / f"{db}-shm"):
                f.touch()
                f.chmod(0o644)
        _check_every_database(home)
    finally:
        os.umask(old)


def test_reopening_a_database_keeps_the_open_connections_locks(home: Path) -> None:
    """Making a database private never opens it: closing any descriptor of the file would
    drop this process's POSIX locks on it, those of a connection already open included, which
    then stopped seeing other processes' commits (a node, after its first distribution, no
    longer found the blobs ``blobmesh add`` put in its store)."""
    add = ("import os, sys; from blobmesh.store import Store\n"
           "with Store(sys.argv[1]) as s: print(s.add_bytes(os.urandom(50_000)).blob_id)")

    def added_by_another_process() -> BlobId:
        out = subprocess.run([sys.executable, "-c", add, str(home)], capture_output=True,
                             text=True, check=True).stdout
        return BlobId.parse(out.strip())

    with Store(home) as store:
        assert store.has(added_by_another_process())
        for _ in range(2):
            Store(home).close()  # this process opens the same store again, as a node does
            assert store.has(added_by_another_process())
        index = PieceIndex(store)  # and its other databases
        index.close()
        assert store.has(added_by_another_process())
