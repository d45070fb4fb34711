"""Which ``dist/*`` ops a node accepts: the authorization rules of distributions (sans-I/O).

The space stores and relays an op only if its author is a current member; on top of that a
validator raising here keeps an op out of the op store, so it is neither applied nor gossiped:

- ``dist/request`` must be signed by the source it names, and, when the node is configured with
  an allowlist of distributors, by one of them.  A handle belongs to the first source seen
  with it: another member cannot take over a distribution by reusing its handle.
- ``dist/summary`` (the outcome of a finished distribution) is accepted only from the
  distribution's source, like a cancel.  Targets publish no ops: their states reach the source
  in progress notifications, which the source takes only from the target that sends them.
- ``dist/cancel`` is accepted only from the distribution's source; a cancel (or a summary) for
  a request not known here yet is refused for now, and gossip offers it again once the request
  arrived.
  Being an op, a cancel is honoured by every node and after every restart.
"""

from __future__ import annotations

from typing import Protocol

from blobmesh.errors import InvalidOpError
from blobmesh.transport.identity import NodeId


class RequestFacts(Protocol):
    @property
    def handle(self) -> str: ...

    @property
    def source(self) -> bytes: ...


class HandleFacts(Protocol):
    @property
    def handle(self) -> str: ...


class OpAuthorizer:
    """Remembers each distribution's source and applies the rules above."""

    def __init__(self, distributors: frozenset[NodeId] | None = None) -> None:
        self.distributors = distributors
        self._sources: dict[str, NodeId] = {}  # one per accepted request, so max_ops bound it

    def source_of(self, handle: str) -> NodeId | None:
        return self._sources.get(handle)

    def authorize_request(self, author: NodeId, request: RequestFacts) -> None:
        try:
            source = NodeId(request.source)
        except ValueError as exc:
            raise InvalidOpError(f"dist/request names a malformed source: {exc}") from exc
        if source != author:
            raise InvalidOpError(f"dist/request signed by {author.short()} names another "
                                 f"source ({source.short()})")
        if self.distributors is not None and author not in self.distributors:
            raise InvalidOpError(f"{author.short()} is not an allowed distributor")
        known = self._sources.setdefault(request.handle, source)
        if known != source:
            raise InvalidOpError(f"distribution {request.handle} belongs to {known.short()}")

    def authorize_cancel(self, author: NodeId, cancel: HandleFacts) -> None:
        self._authorize_source_op("dist/cancel", author, cancel, "cancel it")

    def authorize_summary(self, author: NodeId, summary: HandleFacts) -> None:
        self._authorize_source_op("dist/summary", author, summary, "summarize it")

    def _authorize_source_op(self, kind: str, author: NodeId, op: HandleFacts,
                             what: str) -> None:
        source = self._sources.get(op.handle)
        if source is None:
            raise InvalidOpError(f"{kind} of {op.handle}, unknown here (yet)")
        if source != author:
            raise InvalidOpError(f"{kind} of {op.handle} by {author.short()}: only "
                                 f"its source {source.short()} may {what}")
