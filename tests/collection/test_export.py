"""Exporting trees: atomic, no overwrite without force, full disks and read-only targets."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobmesh.collection import add_tree, export_tree
from blobmesh.errors import ExportError
from blobmesh.store import Store


def _mount_tmpfs(mnt: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _mount_tmpfs(mnt, "size=8m")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_existing_destination_needs_force(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with Store(tmp_path / "home") as store:
        cid = add_tree(store, tree).collection_id
        with pytest.raises(ExportError, match="already exists"):
            export_tree(store, cid, dest)
        assert (dest / "keep.txt").read_text() == "mine"
        export_tree(store, cid, dest, force=True)
    assert not (dest / "keep.txt").exists() and (dest / "model" / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_full_disk_mid_export_leaves_nothing(small_disk: Path, tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    for i in range(6):
        (root / f"part{i}.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    with Store(tmp_path / "home") as store:
        cid = add_tree(store, root).collection_id
        with pytest.raises(ExportError, match="disk full") as err:
            export_tree(store, cid, small_disk / "out")
        assert "\n" not in str(err.value)
        assert list(small_disk.iterdir()) == []  # neither the tree nor its temp dir
        # and a tree that fits still exports there
        (root / "part0.bin").unlink()
        for i in range(1, 5):
            (root / f"part{i}.bin").unlink()
        small = add_tree(store, root).collection_id
        export_tree(store, small, small_disk / "out")
    assert [p.name for p in (small_disk / "out").iterdir()] == ["part5.bin"]


def test_unwritable_destination_is_one_clear_line(tree: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        _mount_tmpfs(ro, "size=1m,ro")
        expect = "read-only file system"
    else:
        ro.chmod(0o500)
        expect = "permission denied"
    try:
        with Store(tmp_path / "home") as store:
            cid = add_tree(store, tree).collection_id
            with pytest.raises(ExportError, match=expect) as err:
                export_tree(store, cid, ro / "out")
            assert "\n" not in str(err.value)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(ro)], check=True)
