"""What a node keeps in its home besides the store: an exclusive lock and its membership state.

``HOME/node.lock`` is held (``flock``) for the node's lifetime, so a second ``node run`` on the
same home stops before it touches anything, the control socket above all.
``HOME/node-state.json`` remembers the listen port (a ticket stays valid across restarts) and
the tickets of the peers this node knew, which it redials on the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from blobmesh.errors import HomeInUseError, InvalidIdError
from blobmesh.store.layout import write_file
from blobmesh.transport import Ticket

log = logging.getLogger(__name__)

STATE_VERSION = 1
MAX_REMEMBERED_PEERS = 64


class HomeLock:
    """An exclusive advisory lock on a node home, released when the process exits."""

    def __init__(self, home: Path) -> None:
        self.path = home / "node.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`HomeInUseError` naming the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise HomeInUseError(f"another node (pid {holder}) is running on home "
                                 f"{self.path.parent}", home=str(self.path.parent)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


@dataclass(slots=True)
class NodeState:
    """The membership state a node persists in ``HOME/node-state.json``."""

    listen_port: int = 0
    peers: list[Ticket] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)  # finished distributions hidden from lists

    @classmethod
    def load(cls, home: Path) -> NodeState:
        """The saved state, or an empty one if there is none or it is unreadable."""
        path = home / "node-state.json"
        try:
            raw = json.loads(path.read_text())
            peers = []
            for text in raw.get("peers", []):
                with contextlib.suppress(InvalidIdError):
                    peers.append(Ticket.parse(str(text)))
            return cls(listen_port=int(raw.get("listen_port", 0)),
                       peers=peers[:MAX_REMEMBERED_PEERS],
                       pruned=[str(h) for h in raw.get("pruned", [])])
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return cls()

    def save(self, home: Path) -> None:
        """Write atomically (a crash leaves the old or the new state, never half of one),
        readable by the owner only (0600, like every file of the home: it holds tickets)."""
        path = home / "node-state.json"
        tmp = path.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # a leftover keeps its mode when opened again: start afresh
        write_file(tmp, json.dumps({
            "version": STATE_VERSION, "listen_port": self.listen_port,
            "peers": [str(t) for t in self.peers[:MAX_REMEMBERED_PEERS]],
            "pruned": self.pruned}, indent=1).encode())
        os.replace(tmp, path)
