"""Typed errors for every blobmesh layer.

Every error carries the context a user needs (which blob, which peer, which path) and a
one-line ``str()`` suitable for the CLI, which prints it without a traceback.
"""

from __future__ import annotations

from typing import Any


class BlobmeshError(Exception):
    """Base class of every error blobmesh raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def __str__(self) -> str:
        return self.message


# --- identifiers -----------------------------------------------------------------------------


class InvalidIdError(BlobmeshError, ValueError):
    """A blob id, node id or ticket string could not be parsed."""

    exit_code = 2


# --- hashing / verification ------------------------------------------------------------------


class VerificationError(BlobmeshError):
    """Data did not match the hash it was supposed to have."""


class CorruptBlobError(VerificationError):
    """Stored data no longer matches its blob id (bit rot, truncation, tampering)."""


# --- store -----------------------------------------------------------------------------------


class StoreError(BlobmeshError):
    """A blob store operation failed."""


class BlobNotFoundError(StoreError, KeyError):
    """No complete blob with this id is in the store."""

    def __str__(self) -> str:
        return self.message


class BlobIncompleteError(StoreError):
    """The blob exists only partially (some pieces are missing)."""


class PinNotFoundError(StoreError, KeyError):
    """No pin with this name exists."""

    def __str__(self) -> str:
        return self.message


class StoreFullError(StoreError, OSError):
    """The disk under the store ran out of space; nothing partial was left visible."""


class SourceError(StoreError):
    """The input to an add (a path or a stream) could not be read."""


# --- network ---------------------------------------------------------------------------------


class TransportError(BlobmeshError):
    """A connection could not be made, or broke."""


class PeerIdentityError(TransportError):
    """The peer presented a key other than the node id we meant to reach."""


class ProtocolError(TransportError):
    """The peer sent something the protocol does not allow (malformed, oversized, unknown)."""


class TransferError(BlobmeshError):
    """A data-transfer channel failed."""


class VoucherRejectedError(TransferError):
    """The other side's validator rejected our voucher."""


class BadPeerDataError(TransferError, VerificationError):
    """A peer sent data that failed verification."""


class ShareError(BlobmeshError):
    """Sharing a blob into, or loading it from, an external file share failed."""


class DeadlineExceededError(ShareError, TimeoutError):
    """A load did not finish before its deadline; partial data was kept."""


class StreamClosedError(TransportError):
    """The peer closed its side of the stream; no more messages will arrive."""


# --- space (membership, peer records, ops) ---------------------------------------------------


class NotAuthorizedError(BlobmeshError):
    """This node may not do that, e.g. cancel a distribution another node started."""

    exit_code = 2


class SpaceError(BlobmeshError):
    """A space (metadata plane) operation failed."""


class SpaceConfigError(SpaceError):
    """A node's space settings contradict each other (e.g. ``--open`` with a secret)."""

    exit_code = 2


class AdmissionError(SpaceError):
    """A peer was refused at the space handshake (other space, wrong secret, not allowed)."""


class InvalidRecordError(SpaceError, VerificationError):
    """A peer record is forged, malformed, expired, from another space or replays an old one."""


class InvalidOpError(SpaceError, VerificationError):
    """An op is malformed, badly signed, oversized, of an unknown kind or failed validation."""


class SpaceLimitError(SpaceError):
    """A configured bound (store size, queue length, rate) was hit; nothing was dropped silently."""


class SpaceStorageError(SpaceError, OSError):
    """The space's database could not be written (e.g. the disk is full); the write was rolled
    back whole, so what it held is neither stored nor half stored."""


class PredicateError(SpaceError, ValueError):
    """A capability predicate expression (e.g. ``gpu=true,mem_gb>=16``) is malformed."""

    exit_code = 2


class BootstrapError(SpaceError):
    """A bootstrap server could not be reached or answered with something invalid."""


# --- shares (external file shares) -----------------------------------------------------------


class InvalidResourceIdError(ShareError, ValueError):
    """A resource id is empty, too long, or not a safe file name (e.g. ``../x``)."""

    exit_code = 2


class InvalidShareUrlError(ShareError, ValueError):
    """A share URL is malformed or uses a scheme no source handles."""

    exit_code = 2


class ShareNotFoundError(ShareError, KeyError):
    """Nothing is shared under this blob id or resource id."""

    def __str__(self) -> str:
        return self.message


class ShareWriteError(ShareError):
    """The share directory could not be written (read-only, permission denied)."""


class ShareFullError(ShareWriteError):
    """The disk under the share directory ran out of space; nothing partial was published."""


class ShareSourceError(ShareError):
    """A share URL did not deliver (HTTP status, connection failure, stall, truncation)."""


class BadShareDataError(ShareSourceError, VerificationError):
    """A share served data that failed verification (wrong manifest, piece layer or piece)."""


class LoadFailedError(ShareError):
    """Every try of every share URL failed; ``context["attempts"]`` lists them all."""


class IdentityError(BlobmeshError):
    """A node's identity key file is unreadable, malformed or readable by other users."""


class DialTimeoutError(TransportError):
    """Connecting to a peer (TCP and TLS handshake) did not finish within the dial timeout."""


# --- collections (trees of blobs) ------------------------------------------------------------


class CollectionError(BlobmeshError):
    """A collection (a directory tree of blobs) could not be built, read or exported."""


class InvalidCollectionError(CollectionError, VerificationError):
    """A collection manifest is malformed or unsafe (``..``, absolute or NUL paths, duplicate
    or case-clashing paths, escaping symlinks, absurd counts or sizes); nothing was written."""


class NotACollectionError(CollectionError):
    """The blob is not a collection manifest."""


class CollectionPathNotFoundError(CollectionError, KeyError):
    """No entry with this path is in the collection."""

    def __str__(self) -> str:
        return self.message


class SourceChangedError(SourceError):
    """A file changed (size or modification time) while it was being added."""


class ExportError(CollectionError):
    """A tree could not be exported (destination exists, disk full, permission denied);
    nothing was left at the destination."""


# --- node ------------------------------------------------------------------------------------


class NodeError(BlobmeshError):
    """A node could not start or be driven as asked."""


class HomeInUseError(NodeError):
    """Another node process holds this home's lock."""


class AmbiguousIdError(InvalidIdError):
    """An id prefix matches more than one blob or distribution."""
