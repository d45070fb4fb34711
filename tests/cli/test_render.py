"""Human views of distributions and of the fleet, as people read them: states (queued,
stalled), an ETA, lowercase booleans, and text that is shown as given, never taken as rich
markup (a scope ``cap:arch in [arm64,amd64]``, the ``[priority]``)."""

from __future__ import annotations

import io
import time

from rich.console import Console, RenderableType

from blobmesh.cli.dashboard_cmds import render_top
from blobmesh.cli.node_cmds import STALLED_AFTER, render_distributions, render_status
from blobmesh.distribution.model import (
    DistributionHandle,
    DistributionState,
    DistributionStatus,
    Priority,
    Scope,
    TargetState,
    TargetStatus,
)
from blobmesh.hashing import hash_bytes
from blobmesh.node.codec import status_to_json
from blobmesh.transport import Identity

MiB = 1024 * 1024


def text_of(renderable: RenderableType) -> str:
    out = io.StringIO()
    Console(file=out, width=250, color_system=None).print(renderable)
    return out.getvalue()


def status(*targets: TargetStatus, scope: str = "cap:arch in [arm64,amd64]") -> DistributionStatus:
    return DistributionStatus(
        handle=DistributionHandle("d-3f2a000000000001"), blob_id=hash_bytes(b"x"),
        size=100 * MiB, scope=Scope.parse(scope), priority=Priority.parse("high"),
        state=DistributionState.ACTIVE, targets=targets, started=time.time() - 30)


def row(text: str, node: TargetStatus) -> str:
    return next(line for line in text.splitlines() if node.node.short() in line)


def test_status_shows_scope_priority_states_and_eta_as_given() -> None:
    now = time.time()
    moving = TargetStatus(Identity.generate().node_id, TargetState.TRANSFERRING,
                          bytes_done=40 * MiB, rate=2 * MiB, updated=now)
    waiting = TargetStatus(Identity.generate().node_id, TargetState.TRANSFERRING, updated=now)
    stuck = TargetStatus(Identity.generate().node_id, TargetState.TRANSFERRING,
                         bytes_done=10 * MiB, updated=now - STALLED_AFTER - 5)
    done = TargetStatus(Identity.generate().node_id, TargetState.COMPLETED,
                        bytes_done=100 * MiB, rate=3 * MiB, updated=now)
    gone = TargetStatus(Identity.generate().node_id, TargetState.CANCELLED,
                        bytes_done=5 * MiB, rate=3 * MiB, reason="cancelled [by d-3f2a]",
                        updated=now)
    text = text_of(render_status(status(moving, waiting, stuck, done, gone)))
    title = text.splitlines()[0]
    assert "to cap:arch in [arm64,amd64]" in title and "[high]" in title
    assert "100.0 MiB" in title and "1/5 done" in title
    assert "transferring" in row(text, moving) and "2.0 MiB/s" in row(text, moving)
    assert "30s" in row(text, moving)  # 60 MiB to go at 2 MiB/s
    assert "queued" in row(text, waiting) and "0.0%" in row(text, waiting)
    assert "stalled" in row(text, stuck)
    assert "completed" in row(text, done) and "MiB/s" not in row(text, done)
    cancelled = row(text, gone)
    assert "MiB/s" not in cancelled  # a cancelled target keeps no rate
    assert "cancelled [by d-3f2a]" in cancelled


def test_top_shows_capabilities_as_given_and_scopes_unmangled() -> None:
    me = Identity.generate().node_id
    other = Identity.generate().node_id
    node = {"node": str(me), "version": "0.1.0", "space": "s", "groups": ["edge"],
            "capabilities": {"gpu": True, "mem_gb": 64}}
    peers = [{"node": str(other), "alive": True, "last_seen_at": time.time(),
              "addresses": ["127.0.0.1:1"], "groups": ["[core]"],
              "capabilities": {"gpu": False, "arch": "arm64"}}]
    s = status(TargetStatus(other, TargetState.TRANSFERRING, bytes_done=MiB, rate=MiB))
    text = text_of(render_top(node, peers, [status_to_json(s)], {}, {}, time.time()))
    assert "gpu=true,mem_gb=64" in text and "arch=arm64,gpu=false" in text
    assert "True" not in text and "False" not in text
    assert "[core]" in text and "cap:arch in [arm64,amd64]" in text
    assert "1m39s" in text  # 99 MiB to go at 1 MiB/s, as every other ETA is written


def test_the_listing_shows_queued_distributions_and_the_slowest_eta() -> None:
    now = time.time()
    a, b = Identity.generate().node_id, Identity.generate().node_id
    moving = status(TargetStatus(a, TargetState.TRANSFERRING, bytes_done=90 * MiB, rate=MiB),
                    TargetStatus(b, TargetState.TRANSFERRING, bytes_done=40 * MiB, rate=MiB))
    behind = status(TargetStatus(a, TargetState.TRANSFERRING),
                    TargetStatus(b, TargetState.COMPLETED, bytes_done=100 * MiB),
                    scope="group:edge")
    text = text_of(render_distributions([moving, behind], now))
    first, second = (line for line in text.splitlines() if "d-3f2a" in line)
    assert "active" in first and "1m00s" in first  # 60 MiB to go at 1 MiB/s, not 10 s
    assert "cap:arch in [arm64,amd64]" in first and "0/2" in first
    assert "queued" in second and "1/2" in second and "group:edge" in second
