"""Adding a directory tree to a store as a collection."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from blobmesh.collection.manifest import Collection, Dir, Entry, File, Symlink
from blobmesh.errors import SourceChangedError, SourceError
from blobmesh.hashing import BlobId, TreeHasher, hash_bytes
from blobmesh.store import LeaseId, Progress, Store

SMALL_FILE = 1024 * 1024
"""Files up to this size are read whole and committed in batches."""
_BATCH_FILES = 256
_HASH_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Source:
    """A file to add: where it is and what it looked like before it was read."""

    rel: str
    path: Path
    size: int
    mtime_ns: int
    executable: bool


@dataclass(slots=True)
class TreeScan:
    """A directory walked without following symlinks: files to read plus the other entries."""

    root: Path
    files: list[_Source] = field(default_factory=list)
    others: list[Entry] = field(default_factory=list)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True, slots=True)
class AddedTree:
    collection_id: BlobId
    collection: Collection
    new_blobs: int
    new_bytes: int


def _rel_name(name: str, where: Path) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise SourceError(f"file name is not UTF-8: {where / name!s}",
                          path=str(where / name)) from None
    return name


def scan_tree(root: str | os.PathLike[str]) -> TreeScan:
    """Walk ``root``; symlinks become entries (never followed), other specials are errors."""
    base = Path(root)
    try:
        if not stat.S_ISDIR(os.stat(base).st_mode):
            raise SourceError(f"not a directory: {base}", path=str(base))
    except FileNotFoundError:
        raise SourceError(f"no such directory: {base}", path=str(base)) from None
    scan = TreeScan(base)

    def walk(directory: Path, prefix: str) -> None:
        try:
            with os.scandir(directory) as it:
                items = sorted(it, key=lambda d: d.name)
        except PermissionError:
            raise SourceError(f"permission denied: {directory}", path=str(directory)) from None
        except OSError as exc:
            raise SourceError(f"cannot read {directory}: {exc.strerror}",
                              path=str(directory)) from exc
        if not items and prefix:
            scan.others.append(Dir(prefix.rstrip("/")))
        for item in items:
            rel = prefix + _rel_name(item.name, directory)
            st = item.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(item.path)
                # "a/./b" and "a//b" mean "a/b": drop what changes nothing
                parts = [p for p in target.split("/") if p not in ("", ".")]
                clean = ("/" if target.startswith("/") else "") + "/".join(parts)
                scan.others.append(Symlink(rel, clean or "."))
            elif stat.S_ISDIR(st.st_mode):
                walk(Path(item.path), rel + "/")
            elif stat.S_ISREG(st.st_mode):
                scan.files.append(_Source(rel, Path(item.path), st.st_size, st.st_mtime_ns,
                                          bool(st.st_mode & 0o111)))
            else:
                raise SourceError(f"not a regular file, directory or symlink: {item.path}",
                                  path=item.path)

    walk(base, "")
    return scan


def _changed(src: _Source, what: str) -> SourceChangedError:
    return SourceChangedError(f"{src.path} changed while it was being added ({what}); "
                              "nothing of the tree was recorded", path=str(src.path))


def _check_unchanged(src: _Source, added_size: int) -> None:
    try:
        st = os.stat(src.path, follow_symlinks=False)
    except FileNotFoundError:
        raise _changed(src, "removed") from None
    if added_size != src.size or st.st_size != src.size:
        raise _changed(src, f"size {src.size} -> {st.st_size}")
    if st.st_mtime_ns != src.mtime_ns:
        raise _changed(src, "modification time")


def _hash_file(src: _Source, progress: Progress | None) -> BlobId:
    def chunks() -> Iterator[bytes]:
        try:
            with open(src.path, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    if progress:
                        progress(len(chunk))
                    yield chunk
        except FileNotFoundError:
            raise _changed(src, "removed") from None
        except OSError as exc:
            raise SourceError(f"cannot read {src.path}: {exc.strerror}",
                              path=str(src.path)) from exc

    hasher = TreeHasher()
    nbytes = 0
    for chunk in chunks():
        hasher.update(chunk)
        nbytes += len(chunk)
    _check_unchanged(src, nbytes)
    return hasher.finalize()[0]


def _read_small(src: _Source) -> bytes:
    try:
        with open(src.path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise _changed(src, "removed") from None
    except PermissionError:
        raise SourceError(f"permission denied: {src.path}", path=str(src.path)) from None
    except OSError as exc:
        raise SourceError(f"cannot read {src.path}: {exc.strerror}",
                          path=str(src.path)) from exc


def add_tree(store: Store, root: str | os.PathLike[str] | TreeScan, *,
             lease: LeaseId | None = None, progress: Progress | None = None,
             on_file: Callable[[str], None] | None = None) -> AddedTree:
    """Add every file under ``root`` (a path or its :func:`scan_tree`), then the collection
    naming them; returns its id.

    Every file is hashed first and stored only if its blob is not here yet, so a new version
    of a tree costs writes only for what changed (``progress`` counts the hashing pass).
    Files that change while being read (size, mtime or content differs between reads) raise
    :class:`SourceChangedError`; the collection is only written once every member is in.
    Small files are read whole and added in batches (``Store.add_many``: one commit each).
    """
    scan = root if isinstance(root, TreeScan) else scan_tree(root)
    if store.home.resolve().is_relative_to(scan.root.resolve()):
        # the store's own files would change under the walk (and grow with every add)
        raise SourceError(f"{scan.root} contains the store home {store.home}; add a "
                          "directory outside it", path=str(scan.root))
    # validate paths and links before reading a byte: a bad tree fails fast
    Collection.build([*scan.others, *(File(f.rel, f.size, f.executable, b"\0" * 32)
                                      for f in scan.files)])
    known = {b.blob_id for b in store.blobs() if b.complete}
    ids: dict[str, BlobId] = {}

    def have(blob_id: BlobId) -> bool:
        """Already stored: no write, no fsync, no commit (only a lease if one is asked)."""
        if blob_id not in known and not store.has(blob_id):
            return False
        if lease is not None:
            store.lease_by_content(blob_id, lease)
        return True

    small = [f for f in scan.files if f.size <= SMALL_FILE]
    large = [f for f in scan.files if f.size > SMALL_FILE]
    for start in range(0, len(small), _BATCH_FILES):
        batch = small[start : start + _BATCH_FILES]
        todo: list[tuple[_Source, bytes]] = []
        for src in batch:
            data = _read_small(src)
            _check_unchanged(src, len(data))
            blob_id = hash_bytes(data)
            if have(blob_id):
                ids[src.rel] = blob_id
            else:
                todo.append((src, data))
        for (src, _), info in zip(todo, store.add_many([d for _, d in todo], lease,
                                                       inline=True), strict=True):
            ids[src.rel] = info.blob_id
        if progress:
            progress(sum(f.size for f in batch))
        if on_file:
            for src in batch:
                on_file(src.rel)
    for src in large:
        # hashing first (a read) spares a new version's unchanged shards a write and fsync
        blob_id = _hash_file(src, progress)
        if not have(blob_id):
            info = store.add_path(src.path, lease)
            _check_unchanged(src, info.size)
            if info.blob_id != blob_id:
                raise _changed(src, "content")
        ids[src.rel] = blob_id
        if on_file:
            on_file(src.rel)
    files = [File(f.rel, f.size, f.executable, ids[f.rel].digest) for f in scan.files]
    collection = Collection.build([*scan.others, *files])
    info = store.add_bytes(collection.encode(), lease)
    new = {f.blob_id: f.size for f in collection.files() if f.blob_id not in known}
    return AddedTree(info.blob_id, collection, len(new), sum(new.values()))
