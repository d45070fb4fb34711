"""External file shares: publish blobs into a directory any static web server serves, and load
them back from share URLs, verified (``docs/shares.md``)."""

from blobmesh.shares.loader import Attempt, LoadProgress, load_blob
from blobmesh.shares.manifest import FORMAT, VERSION, ShareManifest, validate_resource_id
from blobmesh.shares.metrics import ShareMetrics
from blobmesh.shares.service import ShareService
from blobmesh.shares.sharedir import ShareDir, ShareResult
from blobmesh.shares.sources import (
    FileSource,
    HttpSource,
    Source,
    SourceOptions,
    open_source,
    register_source,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "Attempt",
    "FileSource",
    "HttpSource",
    "LoadProgress",
    "ShareDir",
    "ShareManifest",
    "ShareMetrics",
    "ShareResult",
    "ShareService",
    "Source",
    "SourceOptions",
    "load_blob",
    "open_source",
    "register_source",
    "validate_resource_id",
]
