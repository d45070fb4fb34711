"""What applications plug into the transfer manager: validators and revalidators."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from blobmesh.hashing import BlobId
from blobmesh.transfer.channel import ChannelId, Voucher
from blobmesh.transfer.messages import Selector
from blobmesh.transport.identity import NodeId


class Verdict(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    PAUSE = "pause"
    """Accept, but demand a new voucher before (more) data moves."""


@dataclass(frozen=True, slots=True)
class Decision:
    """A validator's answer, with an optional voucher result for the other side."""

    verdict: Verdict
    result: Voucher | None = None
    message: str = ""

    @classmethod
    def accept(cls, result: Voucher | None = None) -> Decision:
        return cls(Verdict.ACCEPT, result)

    @classmethod
    def reject(cls, message: str, result: Voucher | None = None) -> Decision:
        return cls(Verdict.REJECT, result, message)

    @classmethod
    def pause(cls, result: Voucher, message: str = "") -> Decision:
        return cls(Verdict.PAUSE, result, message)


class Validator(Protocol):
    """Decides on incoming requests carrying a voucher of the type it is registered for."""

    def validate_push(self, is_restart: bool, chid: ChannelId, sender: NodeId,
                      voucher: Voucher, blob_id: BlobId, selector: Selector) -> Decision: ...

    def validate_pull(self, is_restart: bool, chid: ChannelId, receiver: NodeId,
                      voucher: Voucher, blob_id: BlobId, selector: Selector) -> Decision: ...


class Revalidator(Protocol):
    """Re-checks a running channel (responder side); a PAUSE decision demands a new voucher,
    and the channel waits until the initiator's ``send_voucher`` is accepted by
    :meth:`revalidate`.  ``None`` means "carry on"."""

    def revalidate(self, chid: ChannelId, voucher: Voucher) -> Decision: ...

    def on_pull_data_sent(self, chid: ChannelId, nbytes: int) -> Decision | None: ...

    def on_push_data_received(self, chid: ChannelId, nbytes: int) -> Decision | None: ...

    def on_complete(self, chid: ChannelId) -> Decision | None: ...


class AcceptAll:
    """A validator that accepts every request (for trusted peers, and the CLI's ``serve``)."""

    def __init__(self, push: bool = True, pull: bool = True) -> None:
        self.push = push
        self.pull = pull

    def validate_push(self, is_restart: bool, chid: ChannelId, sender: NodeId,
                      voucher: Voucher, blob_id: BlobId, selector: Selector) -> Decision:
        return Decision.accept() if self.push else Decision.reject("pushes are not accepted")

    def validate_pull(self, is_restart: bool, chid: ChannelId, receiver: NodeId,
                      voucher: Voucher, blob_id: BlobId, selector: Selector) -> Decision:
        return Decision.accept() if self.pull else Decision.reject("pulls are not accepted")
