"""Verifying complete blobs: a full rehash, remembered for the unchanged data file."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from blobmesh.errors import CorruptBlobError
from blobmesh.hashing import BlobId
from blobmesh.store import LeaseId, PieceReader, Store
from blobmesh.store.layout import file_key
from tests.store.helpers import flip_byte, payload

DAY = 24 * 3600.0
SIZE = 3 * 1024 * 1024  # a data file of several pieces


def added(tmp_path: Path) -> tuple[Store, BlobId]:
    store = Store(tmp_path / "home")
    return store, store.add_bytes(payload(SIZE, seed=5)).blob_id


def test_an_add_counts_as_a_verification_of_its_file(tmp_path: Path) -> None:
    store, blob = added(tmp_path)
    with store:
        assert store.verify(blob, max_age=DAY) is False  # hashed as it was written
        assert store.verify(blob, max_age=0) is True  # max_age 0: always a full rehash
        assert store.verify(blob, max_age=DAY) is False


def test_a_verification_older_than_max_age_is_repeated(tmp_path: Path) -> None:
    store, blob = added(tmp_path)
    with store:
        key = file_key(os.stat(store.layout.data_path(blob)))
        store.db.set_verified(blob, key, time.time() - 100)
        assert store.verify(blob, max_age=200) is False
        assert store.verify(blob, max_age=50) is True
        assert store.verify(blob, max_age=50) is False  # ... and remembered anew


def test_a_write_after_a_remembered_verification_is_caught(tmp_path: Path) -> None:
    store, blob = added(tmp_path)
    with store:
        path = store.layout.data_path(blob)
        before = os.stat(path)
        flip_byte(store, blob, SIZE - 10)
        # even with the modification time put back: the change time moved
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        with pytest.raises(CorruptBlobError, match="piece"):
            store.verify(blob, max_age=DAY)
        assert store.db.verified(blob) is None  # found corrupt: nothing remembered


def test_a_replaced_file_is_rehashed(tmp_path: Path) -> None:
    store, blob = added(tmp_path)
    with store:
        path = store.layout.data_path(blob)
        copy = path.with_name("copy")
        copy.write_bytes(path.read_bytes())
        os.replace(copy, path)  # same content, another inode
        assert store.verify(blob, max_age=DAY) is True


def test_rot_that_keeps_the_file_key_is_caught_where_pieces_are_read(tmp_path: Path) -> None:
    store, blob = added(tmp_path)
    with store:
        flip_byte(store, blob, 10)
        # rot below the file system: the data changes, its file key does not
        key = file_key(os.stat(store.layout.data_path(blob)))
        store.db.set_verified(blob, key, time.time())
        assert store.verify(blob, max_age=DAY) is False  # the limit of the shortcut ...
        reader = PieceReader(store, store.piece_layer(blob), verify=True)
        try:
            with pytest.raises(CorruptBlobError, match="piece 0"):
                reader.read(0)  # ... a sender verifies every piece it sends
        finally:
            reader.close()
        assert store.fsck().problems  # ... and fsck forgets the verification
        with pytest.raises(CorruptBlobError):
            store.verify(blob, max_age=DAY)


def test_inline_data_is_always_rehashed(tmp_path: Path) -> None:
    with Store(tmp_path / "home") as store:
        info = store.add_many([payload(1000, seed=1)], inline=True)[0]
        assert store.verify(info.blob_id, max_age=DAY) is True
        assert store.verify(info.blob_id, max_age=DAY) is True


def test_verify_records_the_lease(tmp_path: Path) -> None:
    store, blob = added(tmp_path)
    with store:
        lease = LeaseId.new("t")
        store.verify(blob, lease, max_age=DAY)
        assert (blob, lease, True) in store.leases(blob)
