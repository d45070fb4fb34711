"""Garbage collection, and recovery from what killed processes left behind.

GC moves files to ``trash/`` under names unique to that GC (``<name>~<pid>-<token>``) inside
its write transaction and deletes them only after the commit; :func:`recover` puts back
(row still there) or deletes (row gone) whatever a killed GC or add left.
"""

from __future__ import annotations

import os
import time
import uuid
from contextlib import suppress
from functools import partial
from pathlib import Path

from blobmesh.hashing import BlobId
from blobmesh.store.db import MetaDB, Undo, has_row
from blobmesh.store.layout import DIR_MODE, Layout, blob_id_from_name
from blobmesh.store.leases import pid_alive
from blobmesh.store.types import GcReport

PARTIAL_GRACE = 24 * 3600.0


class _Rollback(Exception):
    """Ends a write transaction without committing it."""


def collect(db: MetaDB, layout: Layout, *, dry_run: bool, partial_grace: float) -> GcReport:
    """Delete every blob that no live lease and no pin holds (see ``Store.gc``)."""
    report = GcReport()
    moved: list[Path] = []
    undo: Undo = []
    # unique names: another GC's trash files of the same blob may still be there
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with suppress(_Rollback), db.write(undo) as conn:
        for pid, start in conn.execute("SELECT DISTINCT pid, pid_start FROM leases").fetchall():
            if not pid_alive(pid, start):
                cur = conn.execute("DELETE FROM leases WHERE pid=? AND "
                                   "(pid_start IS ? OR pid_start=?)", (pid, start, start))
                report.dead_leases_dropped += cur.rowcount
        rows = conn.execute(
            "SELECT id, size, complete, updated FROM blobs WHERE "
            "id NOT IN (SELECT blob FROM leases) AND id NOT IN (SELECT blob FROM pins)"
        ).fetchall()
        cutoff = time.time() - partial_grace
        for digest, size, complete, updated in rows:
            if not complete and updated > cutoff:
                report.kept += 1
                continue
            blob_id = BlobId(bytes(digest))
            report.deleted.append(blob_id)
            report.bytes_freed += size
            if dry_run:
                continue
            for src in (layout.data_path(blob_id), layout.pieces_path(blob_id)):
                dst = layout.trash / f"{src.name}~{token}"
                with suppress(FileNotFoundError):
                    os.replace(src, dst)
                    moved.append(dst)
                    undo.append(partial(os.replace, dst, src))
            conn.execute("DELETE FROM blobs WHERE id=?", (digest,))
        if dry_run:
            raise _Rollback
    for path in moved:
        path.unlink(missing_ok=True)
    return report


def recover(db: MetaDB, layout: Layout) -> None:
    """Undo what killed processes left: temp files, half-done moves in, half-done GCs."""
    journals: list[Path] = []  # see ``ingest.write_journal``
    for tmp in layout.tmp.iterdir():
        owner = _owner_pid(tmp.name)
        if owner is not None and pid_alive(owner, None):
            continue
        if tmp.suffix == ".moving":
            journals.append(tmp)
        else:
            with suppress(OSError):
                tmp.unlink()
    if not journals and not any(layout.trash.iterdir()):
        return
    with db.write() as conn:
        for journal in journals:
            # the owner died between putting files into blobs/ and committing their rows
            with suppress(OSError):
                for name in journal.read_text().split():
                    moved = blob_id_from_name(name)
                    if moved is not None and not has_row(conn, moved):
                        for path in (layout.data_path(moved), layout.pieces_path(moved)):
                            with suppress(OSError):
                                path.unlink(missing_ok=True)
            journal.unlink(missing_ok=True)
        for item in layout.trash.iterdir():
            name = item.name.split("~")[0]
            blob_id = blob_id_from_name(name)
            if blob_id is not None and has_row(conn, blob_id):
                # a GC died before its commit: the row survived, so the file goes back
                # (unless the blob was added again meanwhile)
                dest = layout.pieces_path(blob_id) if name.endswith(".pieces") \
                    else layout.data_path(blob_id)
                dest.parent.mkdir(DIR_MODE, exist_ok=True)
                if not dest.exists():
                    os.replace(item, dest)
                    continue
            item.unlink(missing_ok=True)


def _owner_pid(name: str) -> int | None:
    parts = name.split("-")
    if len(parts) >= 3 and parts[1].isdigit():
        return int(parts[1])
    return None
