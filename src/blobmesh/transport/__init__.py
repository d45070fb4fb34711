"""Authenticated transport: node identities, TLS 1.3 connections, multiplexed streams."""

from blobmesh.transport.api import Network, Stream, StreamHandler
from blobmesh.transport.identity import NodeId

__all__ = ["Network", "NodeId", "Stream", "StreamHandler"]
