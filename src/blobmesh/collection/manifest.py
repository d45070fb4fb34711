"""The collection manifest: a canonical, versioned encoding of a directory tree of blobs.

A collection blob is ``MAGIC || msgpack([version, entries])`` (see ``docs/collections.md``).
Decoding is strict: anything malformed, unsafe or not in canonical form raises
:class:`InvalidCollectionError` before a caller can act on it, so one tree has exactly one
encoding and therefore one blob id.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

import msgspec

from blobmesh.errors import InvalidCollectionError
from blobmesh.hashing import DIGEST_SIZE, BlobId

MAGIC: Final = b"blobmesh/collection\n"
VERSION: Final = 1

MAX_ENTRIES: Final = 1_000_000
MAX_MANIFEST_BYTES: Final = 256 * 1024 * 1024
MAX_PATH_BYTES: Final = 4096
MAX_NAME_BYTES: Final = 255
MAX_DEPTH: Final = 128
MAX_FILE_SIZE: Final = 1 << 48  # 256 TiB
MAX_TOTAL_SIZE: Final = 1 << 52  # 4 PiB


class File(msgspec.Struct, array_like=True, frozen=True, tag="f"):
    """A regular file: its content is the blob ``blob`` (32-byte id) of ``size`` bytes."""

    path: str
    size: int
    executable: bool
    blob: bytes

    @property
    def blob_id(self) -> BlobId:
        return BlobId(self.blob)


class Symlink(msgspec.Struct, array_like=True, frozen=True, tag="l"):
    """A symbolic link; its target stays inside the tree (``../`` only as a prefix)."""

    path: str
    target: str


class Dir(msgspec.Struct, array_like=True, frozen=True, tag="d"):
    """An empty directory (non-empty ones are implied by their entries)."""

    path: str


Entry = File | Symlink | Dir


class _Manifest(msgspec.Struct, array_like=True, frozen=True):
    version: int
    entries: list[Entry]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Manifest)


@dataclass(frozen=True, slots=True)
class Collection:
    """A validated tree: entries sorted by path (code point order = UTF-8 byte order)."""

    entries: tuple[Entry, ...]

    @classmethod
    def build(cls, entries: Iterable[Entry]) -> Collection:
        """Sort and validate ``entries`` (raises :class:`InvalidCollectionError`)."""
        ordered = tuple(sorted(entries, key=lambda e: e.path))
        validate(ordered)
        return cls(ordered)

    def encode(self) -> bytes:
        return MAGIC + _encoder.encode(_Manifest(VERSION, list(self.entries)))

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Collection:
        """Parse and validate an encoded collection; reject non-canonical encodings."""
        raw = bytes(data)
        if not raw.startswith(MAGIC):
            raise InvalidCollectionError("not a collection manifest (bad magic)")
        if len(raw) > MAX_MANIFEST_BYTES:
            raise InvalidCollectionError(
                f"collection manifest of {len(raw)} bytes exceeds {MAX_MANIFEST_BYTES}")
        body = raw[len(MAGIC):]
        # canonical form starts with a 2-element array header and the version as a fixint
        version = body[1] if len(body) >= 2 and body[0] == 0x92 and body[1] < 0x80 else VERSION
        if version != VERSION:
            raise InvalidCollectionError(f"unsupported collection version {version}",
                                         version=version)
        if len(body) >= 7 and body[2] == 0xDD and int.from_bytes(body[3:7]) > MAX_ENTRIES:
            # an array32 header: refuse an absurd count before decoding anything
            raise InvalidCollectionError(f"collection claims {int.from_bytes(body[3:7])} "
                                         f"entries, more than {MAX_ENTRIES}")
        try:
            manifest = _decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise InvalidCollectionError(f"malformed collection manifest: {exc}") from exc
        if len(manifest.entries) > MAX_ENTRIES:
            raise InvalidCollectionError(
                f"collection has {len(manifest.entries)} entries, more than {MAX_ENTRIES}")
        entries = tuple(manifest.entries)
        validate(entries)
        if _encoder.encode(manifest) != body:
            raise InvalidCollectionError("collection manifest is not in canonical form")
        return cls(entries)

    # --- views -----------------------------------------------------------------------------

    def files(self) -> Iterator[File]:
        return (e for e in self.entries if isinstance(e, File))

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files())

    def members(self) -> dict[BlobId, int]:
        """Distinct member blobs with their sizes, in path order of first use."""
        out: dict[BlobId, int] = {}
        for f in self.files():
            out.setdefault(f.blob_id, f.size)
        return out

    def find(self, path: str) -> Entry | None:
        path = path.strip("/")
        lo, hi = 0, len(self.entries)
        while lo < hi:  # entries are sorted by path
            mid = (lo + hi) // 2
            if self.entries[mid].path < path:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(self.entries) and self.entries[lo].path == path:
            return self.entries[lo]
        return None


def is_collection_prefix(head: bytes) -> bool:
    """Whether a blob starting with ``head`` (at least ``len(MAGIC)`` bytes) is a collection."""
    return head[: len(MAGIC)] == MAGIC


# --- validation --------------------------------------------------------------------------------


def check_path(path: str) -> list[str]:
    """The components of a safe relative path; raises :class:`InvalidCollectionError`."""
    if not path:
        raise InvalidCollectionError("empty path in collection")
    if "\x00" in path:
        raise InvalidCollectionError(f"path {path!r} contains a NUL byte", path=path)
    if path.startswith("/"):
        raise InvalidCollectionError(f"absolute path {path!r} in collection", path=path)
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidCollectionError(f"path {path[:80]!r}... is longer than "
                                     f"{MAX_PATH_BYTES} bytes", path=path)
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        raise InvalidCollectionError(f"path {path[:80]!r} is deeper than {MAX_DEPTH}", path=path)
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidCollectionError(f"path {path!r} has a {part or 'empty'!r} component",
                                         path=path)
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise InvalidCollectionError(f"a name in {path[:80]!r} is longer than "
                                         f"{MAX_NAME_BYTES} bytes", path=path)
    return parts


def check_link_target(path: str, target: str) -> None:
    """A link target must be relative, ``..`` only as a prefix, and never leave the tree.

    ``..`` after a name could step back through another symlink to above the tree, so the
    only form allowed is ``../`` * k followed by names, with k at most the link's depth.
    """
    if not target or "\x00" in target or len(target.encode("utf-8", "surrogatepass")) > \
            MAX_PATH_BYTES:
        raise InvalidCollectionError(f"symlink {path!r} has an empty, NUL or overlong target",
                                     path=path)
    if target.startswith("/"):
        raise InvalidCollectionError(f"symlink {path!r} -> {target!r} is absolute: it escapes "
                                     "the tree", path=path)
    parts = target.split("/")
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    for part in parts[ups:]:
        if part in ("", ".", ".."):
            raise InvalidCollectionError(
                f"symlink {path!r} -> {target!r}: only leading '../' and plain names are "
                "allowed in a target", path=path)
    if ups > path.count("/"):
        raise InvalidCollectionError(f"symlink {path!r} -> {target!r} escapes the tree",
                                     path=path)


def _fold(path: str) -> str:
    return unicodedata.normalize("NFC", path).casefold()


def validate(entries: tuple[Entry, ...]) -> None:
    """Check a sorted entry list: paths, order, clashes, sizes, link targets."""
    if len(entries) > MAX_ENTRIES:
        raise InvalidCollectionError(
            f"collection has {len(entries)} entries, more than {MAX_ENTRIES}")
    by_path: dict[str, Entry] = {}
    total = 0
    prev = ""
    for e in entries:
        check_path(e.path)
        if e.path <= prev:
            if e.path == prev:
                raise InvalidCollectionError(f"duplicate path {e.path!r} in collection",
                                             path=e.path)
            raise InvalidCollectionError(f"collection entries are not sorted at {e.path!r}",
                                         path=e.path)
        prev = e.path
        by_path[e.path] = e
        if isinstance(e, File):
            if len(e.blob) != DIGEST_SIZE:
                raise InvalidCollectionError(f"file {e.path!r} has a malformed blob id",
                                             path=e.path)
            if not 0 <= e.size <= MAX_FILE_SIZE:
                raise InvalidCollectionError(f"file {e.path!r} has an absurd size {e.size}",
                                             path=e.path)
            total += e.size
        elif isinstance(e, Symlink):
            check_link_target(e.path, e.target)
    if total > MAX_TOTAL_SIZE:
        raise InvalidCollectionError(f"collection totals an absurd {total} bytes")
    folded: dict[str, str] = {}
    dirs: set[str] = set()
    for path in by_path:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            above = by_path.get(parent)
            if isinstance(above, Dir):
                raise InvalidCollectionError(f"directory {parent!r} is listed as empty but "
                                             f"holds {path!r}", path=parent)
            if above is not None:
                raise InvalidCollectionError(f"{path!r} lies under {parent!r}, which is not a "
                                             "directory", path=path)
            dirs.add(parent)
    for path in (*by_path, *dirs):
        key = _fold(path)
        other = folded.setdefault(key, path)
        if other != path:
            raise InvalidCollectionError(f"paths {other!r} and {path!r} clash on a "
                                         "case-insensitive file system", path=path)
