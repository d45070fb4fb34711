"""A space's ops: the accepted kinds and their validators, verifying and storing, subscribers.

Whom new ops are pushed to and what to fetch are the dissemination core's; this is what
happens to an op once it is here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from blobmesh.errors import InvalidOpError, SpaceLimitError
from blobmesh.space.config import SpaceConfig
from blobmesh.space.metrics import Metrics
from blobmesh.space.records import Op, check_kind, decode_op, peek_op_id
from blobmesh.space.store import OpStore
from blobmesh.space.subscription import Subscription
from blobmesh.transport.identity import NodeId

log = logging.getLogger(__name__)

OpValidator = Callable[[Op], None]
"""Raises (any exception, ideally :class:`InvalidOpError`) to reject an op of its kind."""


class OpLog:
    """Validates and stores ops, and hands the stored ones to subscribers in arrival order.

    ``is_member`` says whether an author counts; ``on_refused(op_id, author)`` learns of every
    op id refused (``author`` set when it was refused for not being a member).
    """

    def __init__(self, config: SpaceConfig, store: OpStore, metrics: Metrics, *, me: NodeId,
                 is_member: Callable[[NodeId], bool], now_ms: Callable[[], int],
                 on_refused: Callable[[bytes, NodeId | None], None]) -> None:
        self._c = config
        self._store = store
        self._metrics = metrics
        self._me = me
        self._is_member = is_member
        self._now_ms = now_ms
        self._on_refused = on_refused
        self._validators: dict[str, OpValidator | None] = {}
        self._subs: set[Subscription] = set()

    def register_kind(self, kind: str, validator: OpValidator | None) -> None:
        check_kind(kind)
        self._validators[kind] = validator

    def validate(self, op: Op) -> None:
        """Raises :class:`InvalidOpError` unless ``op``'s kind, validator and age accept it."""
        if op.kind not in self._validators:
            raise InvalidOpError(f"unknown op kind {op.kind!r}")
        validator = self._validators[op.kind]
        if validator is not None:
            try:
                validator(op)
            except InvalidOpError:
                raise
            except Exception as exc:
                raise InvalidOpError(f"op {op.id.short()} rejected: {exc}") from exc
        if op.timestamp < self._now_ms() - int(self._c.timing.op_retention * 1000):
            raise InvalidOpError(f"op {op.id.short()} is older than the retention period")

    def add_own(self, op: Op) -> bool:
        """Validate and store an op we signed; False if it was held already."""
        self.validate(op)
        if not self._store.insert([op], gossip=True):
            if self._store.missing([op.id.digest]):
                raise SpaceLimitError(f"op store full ({self._c.limits.max_ops} ops)")
            return False
        self._offer([op])
        return True

    def add(self, raws: Iterable[bytes], sender: NodeId | None) -> list[Op]:
        """Verify, validate and store signed ops; returns those that were new.

        An op counts only if its author is a current member (``ops_rejected_non_member``
        otherwise): a key that was never admitted cannot get an op stored or relayed, whoever
        pushes it.  An op a validator refused is validated once more after the batch's other
        ops are stored, since it may depend on one of them (a cancel on its request).
        """
        lim = self._c.limits
        now = self._now_ms()
        valid: list[Op] = []
        refused: list[Op] = []
        raws = list(raws)
        ids = {raw: peek_op_id(raw, lim) for raw in raws}
        missing = set(self._store.missing(i.digest for i in ids.values() if i is not None))
        for raw in raws:
            op_id = ids[raw]
            if op_id is not None and op_id.digest not in missing:
                continue  # held already: no need to verify it again
            try:
                op = decode_op(raw, space=self._c.name, now_ms=now, limits=lim)
            except InvalidOpError as exc:
                self._refused(op_id.digest if op_id else None, None, exc, sender)
                continue
            if op.author != self._me and not self._is_member(op.author):
                self._metrics.inc("ops_rejected_non_member")
                self._refused(op.id.digest, op.author, "author is not a member", sender)
                continue
            (valid if self._valid(op) else refused).append(op)
        new = self._store.insert(valid, gossip=True)
        again = [op for op in refused if new and self._valid(op)]
        for op in refused:
            if op not in again:
                self._refused(op.id.digest, None, "refused by its kind's validator", sender)
        try:
            if again:
                new += self._store.insert(again, gossip=True)
        finally:  # what the first batch stored reaches subscribers even if the second failed
            if new:
                self._offer(new)
                self._metrics.inc("ops_received", len(new))
        return new

    def inform_stored(self, ops: Iterable[Op]) -> None:
        """Let validated, stored ops enter gossip and reach subscribers."""
        ops = list(ops)
        self._store.mark_gossipable(op.id for op in ops)
        self._offer(ops)

    def subscribe(self, kinds: str | Iterable[str] | None, after: int | None) -> Subscription:
        wanted = None if kinds is None else frozenset([kinds] if isinstance(kinds, str)
                                                      else kinds)
        sub = Subscription(self._store, wanted, self._c.limits.subscriber_queue, after,
                           self._metrics, self._subs.discard)
        self._subs.add(sub)
        return sub

    def close_subscriptions(self) -> None:
        for sub in list(self._subs):
            sub.close()

    def _offer(self, ops: list[Op]) -> None:
        if not self._subs:
            return
        seqs = self._store.seqs(op.id.digest for op in ops)
        for op in ops:
            seq = seqs.get(op.id.digest)
            for sub in list(self._subs):
                if seq is not None and (sub.kinds is None or op.kind in sub.kinds):
                    sub.offer(seq, op)

    def _valid(self, op: Op) -> bool:
        try:
            self.validate(op)
        except InvalidOpError:
            return False
        return True

    def _refused(self, op_id: bytes | None, author: NodeId | None, why: object,
                 sender: NodeId | None) -> None:
        self._metrics.inc("ops_rejected")
        log.debug("rejected op from %s: %s", sender, why)
        if op_id is not None:
            self._on_refused(op_id, author)
