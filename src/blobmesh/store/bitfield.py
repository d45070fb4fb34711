"""Moved to :mod:`blobmesh.types` (the bottom layer, so sans-I/O cores need not import the
store); kept for ``blobmesh.transfer``, which imports it from here."""

from blobmesh.types import Bitfield

__all__ = ["Bitfield"]
