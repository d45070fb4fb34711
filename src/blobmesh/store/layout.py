"""Where a store keeps its files under its home directory."""

from __future__ import annotations

import os
from pathlib import Path

from blobmesh.hashing import BlobId

HOME_ENV = "BLOBMESH_HOME"


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
        for d in (self.home, self.blobs, self.tmp, self.trash, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)

    def data_path(self, blob_id: BlobId) -> Path:
        h = blob_id.hex
        return self.blobs / h[:2] / h

    def pieces_path(self, blob_id: BlobId) -> Path:
        h = blob_id.hex
        return self.blobs / h[:2] / f"{h}.pieces"


def blob_id_from_name(name: str) -> BlobId | None:
    """The blob a file in ``blobs/`` (``<hex>`` or ``<hex>.pieces``) belongs to, if any."""
    try:
        return BlobId(bytes.fromhex(name.split(".")[0]))
    except ValueError:
        return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
