"""Publishing blobs into a share directory that a plain static web server serves as is."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from blobmesh.errors import (
    BadShareDataError,
    BlobmeshError,
    ShareFullError,
    ShareNotFoundError,
    ShareWriteError,
)
from blobmesh.hashing import BlobId, PieceLayer
from blobmesh.shares import manifest as layout
from blobmesh.shares.manifest import ShareManifest
from blobmesh.shares.metrics import ShareMetrics
from blobmesh.store import LeaseId, Store
from blobmesh.store.layout import fsync_dir

COPY_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ShareResult:
    """The outcome of a share: the manifest and whether anything was written."""

    manifest: ShareManifest
    created: bool


class ShareDir:
    """A share directory (layout in :mod:`blobmesh.shares.manifest`).

    Everything appears atomically: a blob's files are staged in ``.staging/``, fsynced and the
    directory renamed into ``blobs/``; resource manifests are written to a temp file and renamed.
    A lock file serialises writers across processes.
    """

    def __init__(self, root: str | os.PathLike[str], metrics: ShareMetrics | None = None) -> None:
        self.root = Path(root)
        self.metrics = metrics if metrics is not None else ShareMetrics()

    def share(self, store: Store, blob_id: BlobId, resource_id: str | None = None) -> ShareResult:
        """Publish a complete blob of ``store`` (and map ``resource_id`` to it).

        Sharing what is already shared is a no-op (``created`` is False).  Raises
        :class:`ShareFullError` / :class:`ShareWriteError` when the directory cannot be written;
        nothing partial is ever visible.
        """
        started = time.monotonic()
        try:
            if resource_id is not None:
                layout.validate_resource_id(resource_id)
            with self._writing(), self._locked():
                layer = store.piece_layer(blob_id)
                manifest = ShareManifest(blob_id, layer.size, layer.piece_size)
                created = False
                if not (self.root / layout.manifest_path(blob_id)).is_file():
                    self._publish_blob(store, layer, manifest)
                    created = True
                if resource_id is not None:
                    mapped = ShareManifest(blob_id, layer.size, layer.piece_size, resource_id)
                    created |= self._replace_file(layout.resource_path(resource_id),
                                                  mapped.to_json())
                    manifest = mapped
        except BaseException:
            self.metrics.record_share(ok=False, nbytes=0, seconds=time.monotonic() - started)
            raise
        self.metrics.record_share(ok=True, nbytes=manifest.size if created else 0,
                                  seconds=time.monotonic() - started)
        return ShareResult(manifest, created)

    def unshare(self, ref: BlobId | str) -> list[str]:
        """Remove a blob (and every resource id naming it) or one resource id.

        A blob shared under a resource id goes with its last resource id.  Returns the removed
        paths, relative to the root; :class:`ShareNotFoundError` when nothing matched.
        """
        if isinstance(ref, str):
            layout.validate_resource_id(ref)
        if not self.root.is_dir():
            raise ShareNotFoundError(f"no share directory at {self.root}", root=str(self.root))
        removed: list[str] = []
        with self._writing(), self._locked():
            mappings = dict(self._mappings())
            if isinstance(ref, BlobId):
                blob_id = ref
                drop = [p for p, m in mappings.items() if m.blob_id == ref]
            else:
                rel = layout.resource_path(ref)
                if rel not in mappings:
                    raise ShareNotFoundError(f"resource {ref!r} is not shared in {self.root}",
                                             resource_id=ref, root=str(self.root))
                blob_id, drop = mappings[rel].blob_id, [rel]
            for rel in drop:
                (self.root / rel).unlink()
                removed.append(rel)
            still_named = any(m.blob_id == blob_id for p, m in mappings.items() if p not in drop)
            blob = self.root / layout.blob_dir(blob_id)
            if not still_named and blob.is_dir():
                # rename first so the blob disappears at once, never half deleted
                doomed = self._staging_dir()
                os.rename(blob, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
                removed.append(layout.blob_dir(blob_id))
            for d in {(self.root / r).parent for r in removed}:
                fsync_dir(d)
        if not removed:
            raise ShareNotFoundError(f"{ref} is not shared in {self.root}", root=str(self.root))
        self.metrics.record_unshare()
        return removed

    # --- internals -------------------------------------------------------------------------

    def _publish_blob(self, store: Store, layer: PieceLayer, manifest: ShareManifest) -> None:
        staging = self._staging_dir()
        staging.mkdir()
        lease = LeaseId.new("share")
        try:
            with store.get_reader(layer.blob_id, lease, verify=True) as reader, \
                    open(staging / "data", "xb") as out:
                while chunk := reader.read(COPY_CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            _write_synced(staging / "pieces", layer.to_bytes())
            _write_synced(staging / "manifest.json", manifest.to_json())
            fsync_dir(staging)
            dest = self.root / layout.blob_dir(layer.blob_id)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, dest)
            fsync_dir(dest.parent)
        finally:
            store.advise_lease_dropped(lease, layer.blob_id)
            shutil.rmtree(staging, ignore_errors=True)

    def _replace_file(self, rel: str, content: bytes) -> bool:
        """Atomically make ``rel`` hold ``content``; False when it already did."""
        path = self.root / rel
        with suppress(FileNotFoundError):
            if path.read_bytes() == content:
                return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            _write_synced(tmp, content)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return True

    def _mappings(self) -> Iterator[tuple[str, ShareManifest]]:
        """Every readable resource manifest, by relative path (unreadable ones name nothing)."""
        folder = self.root / "by-resource"
        if not folder.is_dir():
            return
        for path in folder.glob("*.json"):
            rel = f"by-resource/{path.name}"
            with suppress(OSError, BadShareDataError):
                yield rel, ShareManifest.from_json(path.read_bytes(), where=str(path))

    def _staging_dir(self) -> Path:
        return self.root / ".staging" / f"{os.getpid()}-{uuid.uuid4().hex}"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        staging = self.root / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # writers stage only while holding the lock: anything left is from one that died
            for leftover in staging.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn OS errors on the share directory into typed, one-line errors."""
        try:
            yield
        except BlobmeshError:  # already typed (StoreFullError is an OSError too)
            raise
        except OSError as exc:
            where = str(self.root)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ShareFullError(f"disk full under share directory {where}; nothing was "
                                     "published", root=where) from exc
            if exc.errno == errno.EROFS:
                raise ShareWriteError(f"share directory {where} is on a read-only file system",
                                      root=where) from exc
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise ShareWriteError(f"permission denied writing share directory {where}",
                                      root=where) from exc
            raise ShareWriteError(f"cannot write share directory {where}: "
                                  f"{exc.strerror or exc}", root=where) from exc


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
