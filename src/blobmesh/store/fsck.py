"""Rehash everything in a store and find what is corrupt, missing or orphaned."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from blobmesh.errors import VerificationError
from blobmesh.hashing import BlobId, PieceLayer, hash_piece, piece_count
from blobmesh.store.bitfield import Bitfield
from blobmesh.store.layout import blob_id_from_name

if TYPE_CHECKING:
    from blobmesh.store.store import FsckReport, Progress, Store


def run_fsck(store: Store, *, repair: bool, progress: Progress | None) -> FsckReport:
    from blobmesh.store.store import FsckProblem, FsckReport

    report = FsckReport(repaired=repair)
    layout = store.layout
    known: set[BlobId] = set()
    rows = store._query("SELECT id, size, piece_size, complete, have FROM blobs")
    for digest, size, piece_size, complete, have_raw in rows:
        blob_id = BlobId(bytes(digest))
        known.add(blob_id)
        data_path, pieces_path = layout.data_path(blob_id), layout.pieces_path(blob_id)
        report.checked += 1
        problem = _check_blob(blob_id, size, piece_size, bool(complete), bytes(have_raw),
                              data_path, pieces_path, report, progress)
        if problem is None or not store._query("SELECT 1 FROM blobs WHERE id=?", (digest,)):
            continue  # healthy, or collected by another process while we looked at it
        report.problems.append(FsckProblem(problem[0], str(data_path), blob_id, problem[1]))
        if repair:
            store._quarantine(blob_id, [data_path, pieces_path])
    for sub in sorted(layout.blobs.iterdir()):
        for f in sorted(sub.iterdir()):
            if blob_id_from_name(f.name) not in known and _orphan(store, f, repair):
                report.problems.append(FsckProblem("orphan", str(f), None, "no metadata row"))
    return report


def _check_blob(blob_id: BlobId, size: int, piece_size: int, complete: bool, have_raw: bytes,
                data_path: Path, pieces_path: Path, report: FsckReport,
                progress: Progress | None) -> tuple[str, str] | None:
    try:
        layer = PieceLayer.from_bytes(blob_id, size, piece_size, pieces_path.read_bytes())
    except FileNotFoundError:
        return ("missing", "piece layer file is missing")
    except VerificationError as exc:
        return ("corrupt", f"piece layer: {exc}")
    try:
        actual = os.stat(data_path).st_size
    except FileNotFoundError:
        return ("missing", "data file is missing")
    if actual != size:
        return ("truncated", f"data file has {actual} bytes, expected {size}")
    have = Bitfield(piece_count(size, piece_size), have_raw)
    bad: list[int] = []
    try:
        f = open(data_path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return ("missing", "data file is missing")
    with f:
        for i in range(len(layer)) if complete else list(have):
            off, length = layer.piece_range(i)
            data = os.pread(f.fileno(), length, off)
            report.bytes_checked += len(data)
            if progress:
                progress(len(data))
            if len(data) != length or hash_piece(data) != layer.hashes[i]:
                bad.append(i)
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
        return ("corrupt", f"{len(bad)} bad piece(s): {shown}")
    return None


def _orphan(store: Store, path: Path, repair: bool) -> bool:
    """Whether ``path`` in ``blobs/`` has no row; with ``repair``, move it to quarantine.

    Decided under the write lock: an add in another process that is between moving its
    files in and committing its row holds that lock, so it is never mistaken for an orphan.
    """
    with store._write() as db:
        blob_id = blob_id_from_name(path.name)
        if blob_id is not None and db.execute(
            "SELECT 1 FROM blobs WHERE id=?", (blob_id.digest,)
        ).fetchone():
            return False
        if not path.exists():
            return False
        if repair:
            store._move_to_quarantine(path)
        return True
