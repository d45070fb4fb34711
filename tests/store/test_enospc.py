"""A real full disk: the store's home on an 8 MiB tmpfs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobmesh.errors import StoreFullError
from blobmesh.hashing import hash_stream
from blobmesh.store import LeaseId, Store
from tests.store.helpers import payload

BIG = payload(12 * 1024 * 1024, seed=11)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _visible(store: Store) -> list[Path]:
    return [f for sub in store.layout.blobs.iterdir() for f in sub.iterdir()]


def test_add_on_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(BIG)
    with Store(small_disk / "home") as store:
        kept = store.add_bytes(b"small and safe", LeaseId.new("t")).blob_id
        with pytest.raises(StoreFullError, match="disk full") as err:
            store.add_path(src, LeaseId.new("t"))
        assert str(err.value).count("\n") == 0
        assert [i.blob_id for i in store.blobs()] == [kept]
        assert len(_visible(store)) == 1  # kept's data only (its layer is in the database)
        assert not any(store.layout.tmp.iterdir())
        assert store.fsck().ok
        # space freed (the failed add already gave its own back): the store keeps working
        half = BIG[: 3 * 1024 * 1024]
        info = store.add_bytes(half, LeaseId.new("t"))
        assert store.get_data(info.blob_id, LeaseId.new("r")) == half
    with Store(small_disk / "home") as store:
        assert store.fsck().ok and len(store.blobs()) == 2


def test_partial_blob_on_a_full_disk(small_disk: Path) -> None:
    _, layer = hash_stream([BIG], 1024 * 1024)
    with Store(small_disk / "home") as store:
        # the sparse file fills up piece by piece until the disk is full
        lease = LeaseId.new("rx")
        with pytest.raises(StoreFullError), store.begin_partial(layer, lease) as partial:
            for i in range(len(layer)):
                start, length = layer.piece_range(i)
                partial.write_piece(i, BIG[start : start + length])
        info = store.info(layer.blob_id)
        assert not info.complete and info.pieces_present < len(layer)
        assert store.fsck().ok  # every piece marked present is really there
