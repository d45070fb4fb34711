"""The home's layout on disk: who may read it."""

from __future__ import annotations

import stat
from pathlib import Path

from blobmesh.hashing import PieceLayer, hash_stream
from blobmesh.store import LeaseId, Store


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
