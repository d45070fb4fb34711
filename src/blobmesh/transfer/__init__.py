"""Data transfer: push/pull channels with vouchers, pause/resume/restart, verified streaming.

The protocol is a sans-I/O state machine (:mod:`blobmesh.transfer.channel`) over versioned
messages (:mod:`blobmesh.transfer.messages`); :class:`TransferManager` runs it over a
:class:`~blobmesh.transport.Network` and the store.  See ``docs/transfer.md``.
"""

from blobmesh.transfer.channel import (
    Channel,
    ChannelId,
    ChannelState,
    Event,
    EventCode,
    Stage,
    Status,
    Voucher,
)
from blobmesh.transfer.manager import TransferConfig, TransferManager
from blobmesh.transfer.messages import PROTOCOL, Selector
from blobmesh.transfer.validation import AcceptAll, Decision, Revalidator, Validator, Verdict

__all__ = [
    "PROTOCOL",
    "AcceptAll",
    "Channel",
    "ChannelId",
    "ChannelState",
    "Decision",
    "Event",
    "EventCode",
    "Revalidator",
    "Selector",
    "Stage",
    "Status",
    "TransferConfig",
    "TransferManager",
    "Validator",
    "Verdict",
    "Voucher",
]
