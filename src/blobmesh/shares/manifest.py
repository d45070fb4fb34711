"""The share directory layout and its manifest format (``docs/shares.md``), version 1.

Both the writer and the loader take every path from here, so the layout lives in one place::

    blobs/<blob id>/data            the blob's bytes
    blobs/<blob id>/pieces          its piece layer (32-byte piece hashes, concatenated)
    blobs/<blob id>/manifest.json   the manifest (``resource_id`` null)
    by-resource/<resource id>.json  the manifest of the blob a resource id names
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from blobmesh.errors import BadShareDataError, InvalidResourceIdError
from blobmesh.hashing import DIGEST_SIZE, BlobId, piece_count
from blobmesh.hashing.tree import check_piece_size

FORMAT = "blobmesh-share"
VERSION = 1
MAX_MANIFEST_BYTES = 64 * 1024
MAX_PIECES = 1 << 20  # bounds the piece layer a loader accepts to 32 MiB

# A single path component a static server serves as is: no separators, no leading dot (so
# neither "." nor ".." nor hidden files), nothing that needs URL quoting.
_RESOURCE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


def validate_resource_id(resource_id: str) -> str:
    """Return ``resource_id`` if it is a safe name, else raise :class:`InvalidResourceIdError`."""
    if not isinstance(resource_id, str) or not _RESOURCE_ID.fullmatch(resource_id):
        raise InvalidResourceIdError(
            f"invalid resource id {str(resource_id)[:80]!r}: use 1-200 of A-Z a-z 0-9 . _ -, "
            "not starting with '.' or '-'", resource_id=resource_id)
    return resource_id


def blob_dir(blob_id: BlobId) -> str:
    return f"blobs/{blob_id}"


def data_path(blob_id: BlobId) -> str:
    return f"{blob_dir(blob_id)}/data"


def pieces_path(blob_id: BlobId) -> str:
    return f"{blob_dir(blob_id)}/pieces"


def manifest_path(blob_id: BlobId) -> str:
    return f"{blob_dir(blob_id)}/manifest.json"


def resource_path(resource_id: str) -> str:
    return f"by-resource/{validate_resource_id(resource_id)}.json"


@dataclass(frozen=True, slots=True)
class ShareManifest:
    """What a share says about one blob; everything in it is checked before it is used."""

    blob_id: BlobId
    size: int
    piece_size: int
    resource_id: str | None = None

    @property
    def pieces_bytes(self) -> int:
        """Exact length of the piece layer file."""
        return piece_count(self.size, self.piece_size) * DIGEST_SIZE

    def to_json(self) -> bytes:
        doc = {"format": FORMAT, "version": VERSION, "blob_id": str(self.blob_id),
               "size": self.size, "piece_size": self.piece_size,
               "resource_id": self.resource_id}
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, *, where: str) -> ShareManifest:
        """Parse and validate a manifest; :class:`BadShareDataError` names ``where`` it came from.

        Unknown fields are ignored so version 1 readers accept additive changes.
        """
        def bad(why: str) -> BadShareDataError:
            return BadShareDataError(f"bad share manifest {where}: {why}", where=where)

        try:
            doc: Any = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise bad("not JSON") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise bad(f"not a {FORMAT} manifest")
        if doc.get("version") != VERSION:
            raise bad(f"unsupported version {doc.get('version')!r} (this reader knows {VERSION})")
        size, piece_size, rid = doc.get("size"), doc.get("piece_size"), doc.get("resource_id")
        text_id = doc.get("blob_id")
        if not isinstance(text_id, str):
            raise bad("blob_id is not a string")
        if type(size) is not int or size < 0:
            raise bad("size is not a non-negative integer")
        if type(piece_size) is not int:
            raise bad("piece_size is not an integer")
        try:
            check_piece_size(piece_size)
            blob_id = BlobId.parse(text_id)
            if rid is not None:
                validate_resource_id(rid)
        except ValueError as exc:  # InvalidIdError and InvalidResourceIdError included
            raise bad(str(exc)) from exc
        if piece_count(size, piece_size) > MAX_PIECES:
            raise bad(f"{piece_count(size, piece_size)} pieces is more than {MAX_PIECES}")
        return cls(blob_id, size, piece_size, rid)
