"""Share directories: layout, atomic publish, re-share, unshare, bad names, full/read-only disks."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobmesh.errors import (
    BadShareDataError,
    BlobNotFoundError,
    InvalidResourceIdError,
    ShareFullError,
    ShareNotFoundError,
    ShareWriteError,
)
from blobmesh.hashing import hash_bytes
from blobmesh.shares import ShareDir, ShareManifest
from blobmesh.store import Store
from tests.shares.conftest import MiB, shared_blob


def test_layout_and_manifest(store: Store, share_root: Path) -> None:
    blob_id, data = shared_blob(store, share_root, 1 * MiB + 7, "weights-v1")
    blob = share_root / "blobs" / str(blob_id)
    assert (blob / "data").read_bytes() == data
    assert (blob / "pieces").read_bytes() == store.piece_layer(blob_id).to_bytes()
    own = json.loads((blob / "manifest.json").read_text())
    assert own == {"format": "blobmesh-share", "version": 1, "blob_id": str(blob_id),
                   "size": len(data), "piece_size": 256 * 1024, "resource_id": None}
    named = json.loads((share_root / "by-resource" / "weights-v1.json").read_text())
    assert named == {**own, "resource_id": "weights-v1"}
    assert list((share_root / ".staging").iterdir()) == []
    crashed = share_root / ".staging" / "1-dead"  # what a writer killed mid-share leaves
    crashed.mkdir()
    ShareDir(share_root).unshare("weights-v1")
    assert list((share_root / ".staging").iterdir()) == []


def test_reshare_is_a_noop_and_resource_ids_repoint(store: Store, share_root: Path) -> None:
    share = ShareDir(share_root)
    blob_id, _ = shared_blob(store, share_root, 300_000, "app")
    data_file = share_root / "blobs" / str(blob_id) / "data"
    before = data_file.stat()
    assert not share.share(store, blob_id, "app").created
    assert not share.share(store, blob_id).created
    after = data_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    other = store.add_bytes(b"version 2").blob_id
    assert share.share(store, other, "app").created  # the name now points at the new blob
    manifest = (share_root / "by-resource" / "app.json").read_bytes()
    assert ShareManifest.from_json(manifest, where="app.json").blob_id == other
    assert share.metrics.shares == 3 and share.metrics.share_failures == 0


def test_unshare(store: Store, share_root: Path) -> None:
    share = ShareDir(share_root)
    blob_id, _ = shared_blob(store, share_root, 1000, "a")
    share.share(store, blob_id, "b")
    assert share.unshare("a") == ["by-resource/a.json"]  # still named "b": the blob stays
    assert (share_root / "blobs" / str(blob_id)).is_dir()
    assert share.unshare("b") == ["by-resource/b.json", f"blobs/{blob_id}"]
    assert list((share_root / "blobs").iterdir()) == []
    share.share(store, blob_id, "c")
    assert share.unshare(blob_id) == ["by-resource/c.json", f"blobs/{blob_id}"]
    with pytest.raises(ShareNotFoundError, match="is not shared"):
        share.unshare(blob_id)
    with pytest.raises(ShareNotFoundError, match="resource 'a' is not shared"):
        share.unshare("a")


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", ".hidden", "..", "-rf", "a b", "x" * 201,
                                 "caf\u00e9", "a\\b", "a\x00"])
def test_resource_ids_are_validated(store: Store, share_root: Path, bad: str) -> None:
    blob_id = store.add_bytes(b"x").blob_id
    with pytest.raises(InvalidResourceIdError, match="invalid resource id"):
        ShareDir(share_root).share(store, blob_id, bad)
    assert not share_root.exists()


def test_sharing_a_missing_blob_fails_typed(store: Store, share_root: Path) -> None:
    with pytest.raises(BlobNotFoundError):
        ShareDir(share_root).share(store, hash_bytes(b"not here"))
    assert not (share_root / "blobs").exists()


_GOOD = {"format": "blobmesh-share", "version": 1, "blob_id": str(hash_bytes(b"x")), "size": 1,
         "piece_size": 262144, "resource_id": None}


@pytest.mark.parametrize(("change", "why"), [
    ({"format": "other"}, "not a blobmesh-share manifest"),
    ({"version": 2}, "unsupported version 2"),
    ({"blob_id": "bm1x"}, "malformed blob id"),
    ({"blob_id": 5}, "blob_id is not a string"),
    ({"size": -1}, "size is not a non-negative integer"),
    ({"size": "1"}, "size is not a non-negative integer"),
    ({"piece_size": 1000}, "piece size must be a power of two"),
    ({"resource_id": "../x"}, "invalid resource id"),
    ({"size": 1 << 50, "piece_size": 16384}, "more than 1048576"),
])
def test_bad_manifests_are_rejected(change: dict[str, object], why: str) -> None:
    with pytest.raises(BadShareDataError, match=why):
        ShareManifest.from_json(json.dumps({**_GOOD, **change}).encode(), where="m.json")
    for raw in (b"{", b"[]", b"\xff"):
        with pytest.raises(BadShareDataError, match=r"bad share manifest m\.json"):
            ShareManifest.from_json(raw, where="m.json")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (needs root and mount rights); always unmounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.root
def test_full_disk_publishes_nothing(store: Store, small_fs: Path) -> None:
    share = ShareDir(small_fs / "share")
    big = store.add_bytes(os.urandom(12 * MiB)).blob_id
    with pytest.raises(ShareFullError, match="disk full under share directory"):
        share.share(store, big, "big")
    assert not (small_fs / "share" / "blobs").exists()
    assert list((small_fs / "share" / ".staging").iterdir()) == []
    assert share.metrics.share_failures == 1
    small = store.add_bytes(os.urandom(1 * MiB)).blob_id  # the space was given back
    assert share.share(store, small, "small").created


@pytest.mark.root
def test_read_only_disk(store: Store, small_fs: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    blob_id = store.add_bytes(b"data").blob_id
    with pytest.raises(ShareWriteError, match="read-only file system"):
        ShareDir(small_fs / "share").share(store, blob_id)
