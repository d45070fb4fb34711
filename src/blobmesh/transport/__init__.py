"""Authenticated transport: node identities, TLS 1.3 connections, multiplexed streams."""

from blobmesh.errors import DialTimeoutError, IdentityError
from blobmesh.transport.api import Network, Stream, StreamHandler
from blobmesh.transport.endpoint import Endpoint, TransportConfig, install_uvloop, tune_malloc
from blobmesh.transport.identity import Identity, NodeId, verify_signature
from blobmesh.transport.ticket import Address, Ticket, format_address, parse_address

__all__ = [
    "Address",
    "DialTimeoutError",
    "Endpoint",
    "Identity",
    "IdentityError",
    "Network",
    "NodeId",
    "Stream",
    "StreamHandler",
    "Ticket",
    "TransportConfig",
    "format_address",
    "install_uvloop",
    "parse_address",
    "tune_malloc",
    "verify_signature",
]
