"""Core store behaviour: add, dedup, read, leases, pins, GC."""

from __future__ import annotations

import os

import pytest

from blobmesh.errors import BlobNotFoundError
from blobmesh.hashing import hash_bytes
from blobmesh.store import LeaseId, Store


def test_add_dedup_and_read(store: Store) -> None:
    data = os.urandom(1_000_003)
    a = store.add_bytes(data, LeaseId.new("t"))
    b = store.add_bytes(data)
    assert a.blob_id == b.blob_id == hash_bytes(data)
    assert len(store.blobs()) == 1
    assert store.get_data(a.blob_id, LeaseId.new("r")) == data
    with store.get_reader(a.blob_id, LeaseId.new("r"), verify=True) as r:
        r.seek(-10, os.SEEK_END)
        assert r.read() == data[-10:]


def test_gc_respects_pins_and_leases(store: Store) -> None:
    lease = LeaseId.new("t")
    info = store.add_bytes(b"hello", lease)
    store.pin(info.blob_id, "keep")
    assert store.gc().deleted == []
    store.unpin("keep")
    assert store.gc().deleted == []  # still leased
    store.advise_lease_dropped(lease, info.blob_id)
    assert store.gc().deleted == [info.blob_id]
    with pytest.raises(BlobNotFoundError):
        store.get_data(info.blob_id, lease)
