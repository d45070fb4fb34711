"""Blob id text form: round trip and rejection of every non-canonical spelling."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobmesh.errors import InvalidIdError
from blobmesh.hashing import BlobId, hash_bytes

EMPTY = "bm1r4qrjgdlwroinps63khg4dqnfpzmkuub6mhkxsvw44ccrfrk2yla"


@given(st.binary(min_size=32, max_size=32))
def test_round_trip(digest: bytes) -> None:
    blob_id = BlobId(digest)
    text = str(blob_id)
    assert len(text) == 55 and text.startswith("bm1") and text == text.lower()
    assert BlobId.parse(text) == blob_id
    assert BlobId.parse(f"  {text}\n") == blob_id  # surrounding whitespace only


def test_known_text() -> None:
    assert str(hash_bytes(b"")) == EMPTY
    assert BlobId.parse(EMPTY).short() == EMPTY[:13]


@pytest.mark.parametrize(("text", "reason"), [
    ("", "must start with 'bm1'"),
    ("bm2" + EMPTY[3:], "must start with 'bm1'"),
    ("BM1" + EMPTY[3:], "must start with 'bm1'"),
    ("bm1" + EMPTY[3:].upper(), "outside lowercase base32"),
    (EMPTY[:-1], "expected 52 base32 characters, got 51"),
    (EMPTY + "a", "expected 52 base32 characters, got 53"),
    (EMPTY[:-4] + "====", "outside lowercase base32"),
    (EMPTY[:-1] + "1", "outside lowercase base32"),
    (EMPTY[:-1] + "8", "outside lowercase base32"),
    (EMPTY[:20] + " " + EMPTY[21:], "outside lowercase base32"),
    # 'a' ends in ...00000 bits; 'b' sets one of the 4 unused trailing bits
    (EMPTY[:-1] + "b", "non-canonical"),
    ("nd1" + EMPTY[3:], "must start with 'bm1'"),
])
def test_rejects_malformed(text: str, reason: str) -> None:
    with pytest.raises(InvalidIdError, match=reason):
        BlobId.parse(text)


def test_rejects_non_string_and_wrong_digest() -> None:
    with pytest.raises(InvalidIdError):
        BlobId.parse(b"bm1" + EMPTY[3:].encode())  # type: ignore[arg-type]
    with pytest.raises(InvalidIdError):
        BlobId(b"\x00" * 31)
    assert issubclass(InvalidIdError, ValueError)
