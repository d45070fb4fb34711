"""fsck: rehash everything, report damage, quarantine it with --repair."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from blobmesh.hashing import BlobId
from blobmesh.store import LeaseId, Store
from tests.store.helpers import flip_byte, payload, truncate

DATA = payload(600_000, seed=3)


def _flip(store: Store, blob_id: BlobId) -> None:
    flip_byte(store, blob_id, 300_000)


def _truncate(store: Store, blob_id: BlobId) -> None:
    truncate(store, blob_id, 1000)


def _lose_data(store: Store, blob_id: BlobId) -> None:
    store.layout.data_path(blob_id).unlink()


def _lose_layer(store: Store, blob_id: BlobId) -> None:
    store.layout.pieces_path(blob_id).unlink()


def _damage_layer(store: Store, blob_id: BlobId) -> None:
    """Flip a bit of the layer: in the database (a blob added from memory) or its file."""
    rows = store.db.query("SELECT hashes FROM layers WHERE id=?", (blob_id.digest,))
    path = store.layout.pieces_path(blob_id)
    raw = bytearray(rows[0][0] if rows else path.read_bytes())
    raw[0] ^= 1
    if rows:
        with store.db.write() as db:
            db.execute("UPDATE layers SET hashes=? WHERE id=?", (bytes(raw), blob_id.digest))
    else:
        path.write_bytes(raw)


Damage = Callable[[Store, BlobId], None]


@pytest.mark.parametrize(("damage", "kind", "held"), [
    (_flip, "corrupt", True), (_truncate, "truncated", True), (_lose_data, "missing", True),
    (_damage_layer, "corrupt", True),  # added from memory: the layer is in the database
    (_flip, "corrupt", False), (_truncate, "truncated", False), (_lose_data, "missing", False),
    (_lose_layer, "missing", False), (_damage_layer, "corrupt", False)])  # streamed: a file
def test_fsck_reports_and_repairs(store: Store, damage: Damage, kind: str, held: bool) -> None:
    good = store.add_bytes(b"fine", LeaseId.new("t")).blob_id
    bad = (store.add_bytes(DATA, LeaseId.new("t")) if held else
           store.add_stream([DATA], LeaseId.new("t"))).blob_id
    assert store.layout.pieces_path(bad).exists() is not held
    store.pin(bad, "p")
    clean = store.fsck()
    assert clean.ok and clean.checked == 2 and clean.bytes_checked == len(DATA) + 4
    damage(store, bad)
    report = store.fsck()
    assert [(p.kind, p.blob_id) for p in report.problems] == [(kind, bad)]
    assert store.has(bad)  # a report alone changes nothing
    report = store.fsck(repair=True)
    assert report.repaired and [p.blob_id for p in report.problems] == [bad]
    assert not store.has(bad) and store.has(good)
    assert store.fsck().ok
    assert any(p.name.startswith(bad.hex) for p in store.layout.quarantine.iterdir()) or \
        kind == "missing"


def test_fsck_checks_present_pieces_of_partials(store: Store) -> None:
    from blobmesh.hashing import hash_stream

    _, layer = hash_stream([DATA], 256 * 1024)
    with store.begin_partial(layer, LeaseId.new("rx")) as partial:
        partial.write_piece(1, DATA[256 * 1024 : 512 * 1024])
    flip_byte(store, layer.blob_id, 10)  # piece 0 is absent: not an error
    assert store.fsck().ok
    flip_byte(store, layer.blob_id, 256 * 1024 + 10)
    assert [p.kind for p in store.fsck().problems] == ["corrupt"]


def test_orphans_are_reported_and_quarantined(store: Store) -> None:
    blob_id = store.add_stream([DATA]).blob_id  # streamed: a data and a layer file
    with store.db.write() as db:  # the row is gone, the files stay
        db.execute("DELETE FROM blobs")
    stray = store.layout.blobs / "zz"
    stray.mkdir()
    (stray / "junk").write_bytes(b"?")
    report = store.fsck()
    assert sorted(p.path for p in report.problems if p.kind == "orphan") == sorted(
        [str(store.layout.data_path(blob_id)), str(store.layout.pieces_path(blob_id)),
         str(stray / "junk")])
    store.fsck(repair=True)
    assert store.fsck().ok
    assert len(list(store.layout.quarantine.iterdir())) == 3
