"""Where a store keeps its files under its home directory, and who may read them."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from blobmesh.errors import StoreFullError
from blobmesh.hashing import BlobId

Bytes = bytes | bytearray | memoryview

HOME_ENV = "BLOBMESH_HOME"
DIR_MODE = 0o700
"""The home and its directories: blobs may be private, so only the owner gets in."""
FILE_MODE = 0o600
"""Blob data, piece layers and databases."""
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def default_home() -> Path:
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "blobmesh"


class Layout:
    """``HOME/store.sqlite``, ``HOME/blobs/ab/<hex>`` (+ ``.pieces``), ``tmp``, ``trash``,
    ``quarantine``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.db = home / "store.sqlite"
        self.blobs = home / "blobs"
        self.tmp = home / "tmp"
        self.trash = home / "trash"
        self.quarantine = home / "quarantine"

    def create(self) -> None:
        """Create the directories, all private to the owner (an existing home is made so)."""
        for d in (self.home, self.blobs, self.tmp, self.trash, self.quarantine):
            d.mkdir(DIR_MODE, parents=True, exist_ok=True)
        for d in (self.home, self.blobs, self.tmp, self.trash, self.quarantine):
            if d.stat().st_mode & 0o777 != DIR_MODE:
                d.chmod(DIR_MODE)

    def data_path(self, blob_id: BlobId) -> Path:
        h = blob_id.hex
        return self.blobs / h[:2] / h

    def pieces_path(self, blob_id: BlobId) -> Path:
        h = blob_id.hex
        return self.blobs / h[:2] / f"{h}.pieces"

    def disk_full(self, doing: str) -> StoreFullError:
        return StoreFullError(f"disk full while {doing} {self.home}; nothing was stored",
                              home=str(self.home))

    @contextmanager
    def full_disk(self, doing: str) -> Iterator[None]:
        """Turn ENOSPC/EDQUOT into :class:`StoreFullError`."""
        try:
            yield
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                raise self.disk_full(doing) from exc
            raise


def private_database(path: Path | str) -> None:
    """Make an SQLite database at ``path`` private to the owner before it is opened: created
    0600 if missing (SQLite gives its ``-wal`` and ``-shm`` files the database's mode), and an
    existing one and its ``-wal``/``-shm`` files made 0600 (a home from before this rule).
    Safe to call again once the database is open (where ``mknod`` is not supported, SQLite
    creates the file and that second call makes it private).

    The file is never opened here: closing any descriptor of a database file drops every
    POSIX lock this process holds on it, those of SQLite connections already open included
    (after which such a connection no longer saw other processes' commits).
    """
    path = str(path)
    if path == ":memory:":
        return
    with suppress(OSError):  # it exists, or the filesystem has no mknod for regular files
        os.mknod(path, stat.S_IFREG | FILE_MODE)  # creates without opening
    for suffix in ("", "-wal", "-shm"):
        with suppress(FileNotFoundError):
            if os.stat(f"{path}{suffix}").st_mode & 0o777 != FILE_MODE:
                os.chmod(f"{path}{suffix}", FILE_MODE)


def blob_id_from_name(name: str) -> BlobId | None:
    """The blob a file in ``blobs/`` (``<hex>`` or ``<hex>.pieces``) belongs to, if any."""
    try:
        return BlobId(bytes.fromhex(name.split(".")[0]))
    except ValueError:
        return None


def file_key(st: os.stat_result) -> str:
    """What tells one version of a data file from another: device, inode, size,
    modification and change time (ns).  Writing to the file or replacing it changes it, and
    the change time cannot be set back."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def create_file(path: Path) -> int:
    """A new file (``O_EXCL``) open for writing, readable by the owner only."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)


def write_file(path: Path, data: Bytes, *, sync: bool = False) -> None:
    """Write a whole file (owner-only; an existing one is replaced), fsynced with ``sync``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        mv = memoryview(data)
        while mv:
            mv = mv[os.write(fd, mv):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
