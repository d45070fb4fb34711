"""Lease identities and process liveness.

A lease names a consumer and the process it lives in.  Liveness is checked, not trusted:
a pid counts as alive only while ``/proc/PID`` exists with the start time recorded when the
lease was taken, so a recycled pid does not keep a dead consumer's blobs alive.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass


def pid_start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` in clock ticks, or None when it does not run."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return _kill0(pid)
    # the command name may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None  # exited, not yet reaped: it will never use its leases again
    return int(fields[19])


def _kill0(pid: int) -> int | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return 0
    return 0


def pid_alive(pid: int, start: int | None) -> bool:
    now = pid_start_time(pid)
    if now is None:
        return False
    return start is None or start == 0 or now == 0 or now == start


@dataclass(frozen=True, slots=True)
class LeaseId:
    """Who holds a blob: a consumer name (unique per lease holder) and its process id."""

    consumer: str
    pid: int

    @classmethod
    def new(cls, consumer: str = "lease") -> LeaseId:
        """A fresh lease for a consumer in this process."""
        return cls(f"{consumer}:{uuid.uuid4().hex[:16]}", os.getpid())

    @classmethod
    def named(cls, consumer: str) -> LeaseId:
        """A stable lease name for this process (the same name twice is the same lease)."""
        return cls(consumer, os.getpid())

    def __str__(self) -> str:
        return f"{self.consumer}@{self.pid}"
