"""Rehash everything in a store and find what is corrupt, missing or orphaned."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from blobmesh.errors import VerificationError
from blobmesh.hashing import BlobId, PieceLayer, hash_piece, piece_count
from blobmesh.store.bitfield import Bitfield

if TYPE_CHECKING:
    from blobmesh.store.store import FsckReport, Progress, Store


def run_fsck(store: Store, *, repair: bool, progress: Progress | None) -> FsckReport:
    from blobmesh.store.store import FsckProblem, FsckReport

    report = FsckReport(repaired=repair)
    layout = store.layout
    known: set[str] = set()
    rows = store._query("SELECT id, size, piece_size, complete, have FROM blobs")
    for digest, size, piece_size, complete, have_raw in rows:
        blob_id = BlobId(bytes(digest))
        known.add(blob_id.hex)
        data_path, pieces_path = layout.data_path(blob_id), layout.pieces_path(blob_id)
        report.checked += 1
        problem = _check_blob(blob_id, size, piece_size, bool(complete), bytes(have_raw),
                              data_path, pieces_path, report, progress)
        if problem is None:
            continue
        report.problems.append(FsckProblem(problem[0], str(data_path), blob_id, problem[1]))
        if repair:
            store._quarantine(blob_id, [data_path, pieces_path])
    for sub in sorted(layout.blobs.iterdir()) if layout.blobs.exists() else []:
        for f in sorted(sub.iterdir()):
            if f.name.split(".")[0] in known:
                continue
            # orphans: data with no row; re-check under the write lock so an add that is
            # between its rename and its commit in another process is not mistaken for one
            report.problems.append(FsckProblem("orphan", str(f), None, "no metadata row"))
            if repair:
                _quarantine_orphan(store, f)
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
    with open(data_path, "rb") as f:
        for i in range(len(layer)) if complete else list(have):
            off, length = layer.piece_range(i)
            data = os.pread(f.fileno(), length, off)
            report.bytes_checked += len(data)
            if progress:
                progress(len(data))
            if hash_piece(data) != layer.hashes[i]:
                bad.append(i)
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
        return ("corrupt", f"{len(bad)} bad piece(s): {shown}")
    return None


def _quarantine_orphan(store: Store, path: Path) -> None:
    with store._write() as db:
        try:
            blob_id = BlobId(bytes.fromhex(path.name.split(".")[0]))
        except ValueError:
            blob_id = None
        if blob_id is not None and db.execute(
            "SELECT 1 FROM blobs WHERE id=?", (blob_id.digest,)
        ).fetchone():
            return
    store._quarantine(None, [path])
