"""blobmesh: store, move and distribute content-addressed blobs across a fleet of nodes."""

from blobmesh.hashing import BlobId

__all__ = ["BlobId", "__version__"]

__version__ = "0.1.0"
