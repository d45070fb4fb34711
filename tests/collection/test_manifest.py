"""The collection manifest: canonical encoding and the malicious-manifest suite."""

from __future__ import annotations

import msgspec
import pytest

from blobmesh.collection.manifest import (
    MAGIC,
    MAX_ENTRIES,
    Collection,
    Dir,
    Entry,
    File,
    Symlink,
    _Manifest,
)
from blobmesh.errors import InvalidCollectionError
from blobmesh.hashing import hash_bytes

B = hash_bytes(b"x").digest


def raw(entries: list[Entry], version: int = 1) -> bytes:
    """An encoding that skips every check: what a hostile peer could send."""
    return MAGIC + msgspec.msgpack.encode(_Manifest(version, entries))


def test_round_trip_is_canonical() -> None:
    coll = Collection.build([File("b/ü.txt", 1, False, B), Dir("a"), Symlink("b/l", "ü.txt"),
                             File("run", 0, True, B)])
    assert [e.path for e in coll.entries] == ["a", "b/l", "b/ü.txt", "run"]
    data = coll.encode()
    assert Collection.decode(data) == coll
    assert Collection.decode(data).encode() == data
    assert coll.members() == {hash_bytes(b"x"): 1}
    assert coll.find("/b/ü.txt") == File("b/ü.txt", 1, False, B)
    assert coll.find("b") is None


BAD: dict[str, list[Entry]] = {
    "dot-dot": [File("a/../b", 1, False, B)],
    "leading-dot-dot": [File("../etc/passwd", 1, False, B)],
    "absolute": [File("/etc/passwd", 1, False, B)],
    "nul": [File("a\x00b", 1, False, B)],
    "empty component": [File("a//b", 1, False, B)],
    "trailing slash": [File("a/", 1, False, B)],
    "dot": [File("./a", 1, False, B)],
    "empty path": [File("", 1, False, B)],
    "duplicate": [File("a", 1, False, B), File("a", 1, False, B)],
    "duplicate kinds": [Dir("a"), File("a", 1, False, B)],
    "unsorted": [File("b", 1, False, B), File("a", 1, False, B)],
    "case clash": [File("Model.bin", 1, False, B), File("model.bin", 1, False, B)],
    "case clash of dirs": [File("A/x", 1, False, B), File("a/y", 1, False, B)],
    "unicode normal forms": [File("cafe\u0301", 1, False, B), File("caf\u00e9", 1, False, B)],
    "file as dir": [File("a", 1, False, B), File("a/b", 1, False, B)],
    "link as dir": [Symlink("a", "b"), File("a/x", 1, False, B), File("b/x", 1, False, B)],
    "non-empty dir entry": [Dir("a"), File("a/x", 1, False, B)],
    "absolute link": [Symlink("l", "/etc")],
    "escaping link": [Symlink("a/l", "../../x")],
    "escaping link at root": [Symlink("l", "..")],
    "dot-dot after a name": [Symlink("d/l", "x/../../..")],
    "link with NUL": [Symlink("l", "a\x00")],
    "empty link": [Symlink("l", "")],
    "negative size": [File("a", -1, False, B)],
    "absurd size": [File("a", 1 << 60, False, B)],
    "short blob id": [File("a", 1, False, B[:31])],
    "long name": [File("x" * 256, 1, False, B)],
    "deep": [File("/".join(["d"] * 200), 1, False, B)],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malicious_manifest_is_rejected(case: str) -> None:
    with pytest.raises(InvalidCollectionError) as err:
        Collection.decode(raw(BAD[case]))
    assert "\n" not in str(err.value)
    if case != "unsorted":  # build sorts its input
        with pytest.raises(InvalidCollectionError):
            Collection.build(BAD[case])


def test_absurd_entry_count_is_rejected() -> None:
    # a header claiming 4 billion entries is refused before anything is decoded
    with pytest.raises(InvalidCollectionError, match="more than"):
        Collection.decode(MAGIC + b"\x92\x01\xdd\xff\xff\xff\xff")
    many = [File(f"f{i:07}", 0, False, B) for i in range(MAX_ENTRIES + 1)]
    with pytest.raises(InvalidCollectionError, match="more than"):
        Collection.build(many)


@pytest.mark.parametrize("data", [
    b"", b"not a collection", MAGIC, MAGIC + b"\x92\x01", MAGIC + b"\x92\x01\x91\x93",
    MAGIC + b"\xc1", MAGIC + b"\x92\x01\x90\x00",  # trailing byte
])
def test_garbage_is_rejected(data: bytes) -> None:
    with pytest.raises(InvalidCollectionError):
        Collection.decode(data)


def test_unknown_version_is_named() -> None:
    with pytest.raises(InvalidCollectionError, match="unsupported collection version 2"):
        Collection.decode(raw([], version=2))


def test_non_canonical_encoding_is_rejected() -> None:
    good = raw([File("a", 1, False, B)])
    # the same manifest with the size as a 64-bit integer instead of a fixint
    assert good.count(b"\x01") >= 2
    i = good.index(b"\xa1a") + 2
    assert good[i] == 0x01
    loose = good[:i] + b"\xcf" + (1).to_bytes(8, "big") + good[i + 1 :]
    assert msgspec.msgpack.decode(loose[len(MAGIC):]) == msgspec.msgpack.decode(
        good[len(MAGIC):])
    with pytest.raises(InvalidCollectionError, match="canonical"):
        Collection.decode(loose)


def test_links_inside_the_tree_are_fine() -> None:
    coll = Collection.build([Symlink("a/b/l", "../../top"), Symlink("a/m", "b/l"),
                             File("top", 1, False, B)])
    assert Collection.decode(coll.encode()) == coll
