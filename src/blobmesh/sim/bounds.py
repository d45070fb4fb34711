"""The Kumar–Ross lower bound on the time to give every peer a copy of a file.

A server of upload ``u_s`` holds a file of ``F`` bytes; ``N`` peers with downloads ``d_i`` and
uploads ``u_i`` all want it.  No schedule beats

    T >= max(F / u_s,  F / min d_i,  N·F / (u_s + Σ u_i))

— the server must send every byte once, the slowest downloader must receive it, and the
``N·F`` bytes delivered in all must fit through the total upload (R. Kumar, K. Ross, *Peer
Assisted File Distribution: The Minimum Distribution Time*, 2006; reachable in the fluid
limit).  With equal links (``u_s = u_i = d_i = u``) it is ``F/u``.
"""

from __future__ import annotations

from collections.abc import Sequence


def kumar_ross(size: float, server_up: float, downs: Sequence[float],
               ups: Sequence[float]) -> float:
    """The lower bound (seconds) for ``size`` bytes; rates in bytes/s, one per peer."""
    if len(downs) != len(ups) or not downs:
        raise ValueError("need one download and one upload rate per peer, at least one peer")
    if server_up <= 0 or min(downs) <= 0:
        raise ValueError("rates must be positive")
    n = len(downs)
    return max(size / server_up, size / min(downs), n * size / (server_up + sum(ups)))


__all__ = ["kumar_ross"]
