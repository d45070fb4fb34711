"""Which secret a node's space uses: closed by default, the secret travelling in join tickets."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from blobmesh.errors import SpaceConfigError
from blobmesh.transport.ticket import Ticket

SECRET_FILE = "space.secret"
SECRET_SIZE = 32


def space_of(tickets: Sequence[Ticket], default: str = "blobmesh") -> str:
    """The space named by join tickets (all must agree), else ``default``."""
    names = {t.space for t in tickets if t.space is not None}
    if len(names) > 1:
        raise SpaceConfigError(f"the bootstrap tickets name different spaces: "
                               f"{', '.join(sorted(names))}")
    return names.pop() if names else default


def join_secret(home: Path, *, space: str, secret: bytes | None, tickets: Sequence[Ticket],
                open_space: bool) -> bytes | None:
    """The space secret a node in ``home`` uses (None: an open space).

    In order: ``secret`` (from ``--secret-file``); the secret carried by the join tickets; the
    one kept in ``home`` from an earlier run; else a new random one, kept in ``home`` (mode
    0600) so a restart stays in the same space.  ``open_space`` asks for no secret at all.
    Raises :class:`SpaceConfigError` on contradictions (another space, ``--open`` with a
    secret, a closed node given an open space's ticket).
    """
    joined = [t for t in tickets if t.space is not None]
    for t in joined:
        if t.space != space:
            raise SpaceConfigError(f"ticket of {t.node_id.short()} is for space {t.space!r}, "
                                   f"not {space!r}")
    carried = {t.secret for t in joined}
    if open_space:
        if secret is not None or carried - {None}:
            raise SpaceConfigError("--open asks for an open space, but a secret was given "
                                   "(a secret file or a closed space's ticket)")
        return None
    if secret is not None:
        if carried and carried != {secret}:
            raise SpaceConfigError("the bootstrap ticket carries another secret than the "
                                   "secret file (drop one of them)")
        return secret
    if len(carried) > 1:
        raise SpaceConfigError("the bootstrap tickets carry different secrets")
    if carried == {None}:
        raise SpaceConfigError(f"the ticket is for the open space {space!r}: run with --open "
                               "to join it")
    path = home / SECRET_FILE
    if carried:
        ticket_secret = carried.pop()
        assert ticket_secret is not None
        _keep(path, ticket_secret)
        return ticket_secret
    try:
        kept = path.read_bytes()
    except FileNotFoundError:
        kept = b""
    except OSError as exc:
        raise SpaceConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if kept:
        return kept
    fresh = secrets.token_bytes(SECRET_SIZE)
    _keep(path, fresh)
    return fresh


def _keep(path: Path, secret: bytes) -> None:
    """Write ``secret`` to ``path`` atomically, readable by the owner only."""
    with contextlib.suppress(FileNotFoundError):
        if path.read_bytes() == secret:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise SpaceConfigError(f"cannot write {path}: {exc.strerror}") from exc
