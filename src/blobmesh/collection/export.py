"""Materialising a collection as a directory tree: built in a temp dir, renamed into place."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from contextlib import suppress
from pathlib import Path

from blobmesh.collection.catalog import read_collection
from blobmesh.collection.manifest import Collection, Dir, File, Symlink
from blobmesh.errors import ExportError
from blobmesh.hashing import BlobId
from blobmesh.store import Progress, Store
from blobmesh.store.layout import fsync_dir

_CHUNK = 4 * 1024 * 1024


def export_tree(store: Store, blob_id: BlobId, dest: str | os.PathLike[str], *,
                force: bool = False, progress: Progress | None = None) -> Collection:
    """Write collection ``blob_id`` to the directory ``dest``, verifying every byte.

    The tree is built in a hidden temp dir beside ``dest`` and renamed into place, so ``dest``
    either is the whole tree or is untouched: a full disk or a permission error midway leaves
    nothing behind.  An existing ``dest`` is replaced only with ``force``.
    """
    coll = read_collection(store, blob_id)
    missing = [m for m in coll.members() if not store.has(m)]
    if missing:
        raise ExportError(f"collection {blob_id.short()} is not complete here: "
                          f"{len(missing)} of {len(coll.members())} member blob(s) missing",
                          blob_id=blob_id)
    target = Path(dest)
    if (target.exists() or target.is_symlink()) and not force:
        raise ExportError(f"{target} already exists (use --force to replace it)",
                          path=str(target))
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.export")
    try:
        try:
            os.mkdir(tmp, 0o700)
        except FileNotFoundError:
            raise ExportError(f"no such directory: {target.parent}",
                              path=str(target.parent)) from None
        _build(store, coll, tmp, progress)
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
            os.rename(target, old)
            os.rename(tmp, target)
            _remove(old)
        else:
            os.rename(tmp, target)
        fsync_dir(target.parent)
    except OSError as exc:
        _remove(tmp)
        raise _export_error(exc, target) from exc
    except BaseException:
        _remove(tmp)
        raise
    return coll


def _build(store: Store, coll: Collection, root: Path, progress: Progress | None) -> None:
    dirs: list[Path] = [root]
    links: list[Symlink] = []
    for entry in coll.entries:
        path = root / entry.path
        if isinstance(entry, Dir):
            path.mkdir(parents=True, exist_ok=True)
            dirs.append(path)
            continue
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            dirs.append(path.parent)
        if isinstance(entry, Symlink):
            links.append(entry)  # last: nothing is ever written through a link
            continue
        _write_file(store, entry, path, progress)
    for link in links:
        os.symlink(link.target, root / link.path)
    for d in reversed(dirs):
        fsync_dir(d)


def _write_file(store: Store, entry: File, path: Path, progress: Progress | None) -> None:
    mode = 0o777 if entry.executable else 0o666
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)  # umask applies
    try:
        with store.get_reader(entry.blob_id, None, verify=True) as reader:
            while chunk := reader.read(_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                if progress:
                    progress(len(chunk))
        os.fsync(fd)
    finally:
        os.close(fd)


_UMASK: int | None = None


def _umask() -> int:
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def _remove(path: Path) -> None:
    with suppress(OSError):
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)


def _export_error(exc: OSError, target: Path) -> ExportError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExportError(f"disk full while exporting to {target}; nothing was left there",
                           path=str(target))
    if exc.errno == errno.EROFS:
        return ExportError(f"cannot export to {target}: read-only file system",
                           path=str(target))
    if exc.errno in (errno.EACCES, errno.EPERM):
        where = exc.filename or target.parent
        return ExportError(f"permission denied: cannot export to {target} ({where})",
                           path=str(target))
    return ExportError(f"cannot export to {target}: {exc.strerror or exc}", path=str(target))
