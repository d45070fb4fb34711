"""Rehash everything in a store and find what is corrupt, missing or orphaned."""

from __future__ import annotations

import os
import time
import uuid
from contextlib import ExitStack, suppress
from pathlib import Path

from blobmesh.errors import VerificationError
from blobmesh.hashing import BlobId, PieceLayer, hash_piece, piece_count
from blobmesh.store.db import MetaDB, inline_content
from blobmesh.store.layout import Layout, blob_id_from_name, write_file
from blobmesh.store.types import FsckProblem, FsckReport, Progress
from blobmesh.types import Bitfield


def run_fsck(db: MetaDB, layout: Layout, *, repair: bool,
             progress: Progress | None) -> FsckReport:
    """Rehash every present piece; report (and with ``repair`` quarantine) bad data."""
    report = FsckReport(repaired=repair)
    known: set[BlobId] = set()
    rows = db.query("SELECT id, size, piece_size, complete, have, hashes, "
                    "contents.id IS NOT NULL FROM blobs LEFT JOIN layers USING (id) "
                    "LEFT JOIN contents USING (id)")
    for digest, size, piece_size, complete, have_raw, hashes, inline in rows:
        blob_id = BlobId(bytes(digest))
        known.add(blob_id)
        data_path, pieces_path = layout.data_path(blob_id), layout.pieces_path(blob_id)
        report.checked += 1
        problem = _check_blob(blob_id, size, piece_size, bool(complete), bytes(have_raw),
                              None if hashes is None else bytes(hashes),
                              db.content(blob_id) if inline else None, data_path,
                              pieces_path, report, progress)
        if problem is None or not db.query("SELECT 1 FROM blobs WHERE id=?", (digest,)):
            continue  # healthy, or collected by another process while we looked at it
        report.problems.append(FsckProblem(problem[0], str(data_path), blob_id, problem[1]))
        db.forget_verified(blob_id)  # a verification remembered from before no longer counts
        if repair:
            quarantine(db, layout, blob_id, [data_path, pieces_path])
    for sub in sorted(layout.blobs.iterdir()):
        for f in sorted(sub.iterdir()):
            if blob_id_from_name(f.name) not in known and _orphan(db, layout, f, repair):
                report.problems.append(FsckProblem("orphan", str(f), None, "no metadata row"))
    return report


def _check_blob(blob_id: BlobId, size: int, piece_size: int, complete: bool, have_raw: bytes,
                hashes: bytes | None, inline: bytes | None, data_path: Path, pieces_path: Path,
                report: FsckReport, progress: Progress | None) -> tuple[str, str] | None:
    """What is wrong with one blob; its layer is ``hashes`` (from ``layers``) or its file,
    its data ``inline`` (from ``contents``) or its file."""
    try:
        raw = pieces_path.read_bytes() if hashes is None else hashes
        layer = PieceLayer.from_bytes(blob_id, size, piece_size, raw)
    except FileNotFoundError:
        return ("missing", "piece layer file is missing")
    except VerificationError as exc:
        return ("corrupt", f"piece layer: {exc}")
    try:
        actual = os.stat(data_path).st_size if inline is None else len(inline)
    except FileNotFoundError:
        return ("missing", "data file is missing")
    if actual != size:
        return ("truncated", f"data has {actual} bytes, expected {size}")
    have = Bitfield(piece_count(size, piece_size), have_raw)
    bad: list[int] = []
    with ExitStack() as stack:
        if inline is None:
            try:
                f = stack.enter_context(open(data_path, "rb"))
            except FileNotFoundError:
                return ("missing", "data file is missing")
        for i in range(len(layer)) if complete else list(have):
            off, length = layer.piece_range(i)
            data = os.pread(f.fileno(), length, off) if inline is None else \
                inline[off : off + length]
            report.bytes_checked += len(data)
            if progress:
                progress(len(data))
            if len(data) != length or hash_piece(data) != layer.hashes[i]:
                bad.append(i)
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
        return ("corrupt", f"{len(bad)} bad piece(s): {shown}")
    return None


def _orphan(db: MetaDB, layout: Layout, path: Path, repair: bool) -> bool:
    """Whether ``path`` in ``blobs/`` has no row; with ``repair``, move it to quarantine.

    Decided under the write lock: an add in another process that is between moving its
    files in and committing its row holds that lock, so it is never mistaken for an orphan.
    """
    with db.write() as conn:
        blob_id = blob_id_from_name(path.name)
        if blob_id is not None and conn.execute(
            "SELECT 1 FROM blobs WHERE id=?", (blob_id.digest,)
        ).fetchone():
            return False
        if not path.exists():
            return False
        if repair:
            _move_to_quarantine(layout, path)
        return True


def quarantine(db: MetaDB, layout: Layout, blob_id: BlobId, paths: list[Path]) -> None:
    """Move a blob's files (or its data kept inline, as a file) out of the store and forget
    it (caller holds no transaction)."""
    with db.write() as conn:
        for p in paths:
            _move_to_quarantine(layout, p)
        data = inline_content(conn, blob_id)
        if data is not None:
            write_file(_quarantine_path(layout, blob_id.hex), data)
        conn.execute("DELETE FROM blobs WHERE id=?", (blob_id.digest,))


def _quarantine_path(layout: Layout, name: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    return layout.quarantine / f"{name}.{stamp}-{uuid.uuid4().hex[:6]}"


def _move_to_quarantine(layout: Layout, path: Path) -> None:
    with suppress(FileNotFoundError):
        os.replace(path, _quarantine_path(layout, path.name))
