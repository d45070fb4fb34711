"""Collections: directory trees of blobs, named and verified by one blob id
(``docs/collections.md``)."""

from blobmesh.collection.catalog import (
    Summary,
    check,
    collections,
    gc,
    is_collection,
    is_member_pin,
    maybe_collection,
    pin,
    protect_pinned,
    read_collection,
    summarize,
    unpin,
)
from blobmesh.collection.export import export_tree
from blobmesh.collection.manifest import MAGIC, VERSION, Collection, Dir, Entry, File, Symlink
from blobmesh.collection.tree import AddedTree, add_tree, scan_tree

__all__ = [
    "MAGIC",
    "VERSION",
    "AddedTree",
    "Collection",
    "Dir",
    "Entry",
    "File",
    "Summary",
    "Symlink",
    "add_tree",
    "check",
    "collections",
    "export_tree",
    "gc",
    "is_collection",
    "is_member_pin",
    "maybe_collection",
    "pin",
    "protect_pinned",
    "read_collection",
    "scan_tree",
    "summarize",
    "unpin",
]
