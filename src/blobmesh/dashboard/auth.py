"""Who may use the node's HTTP listener (sans-I/O: a request's facts in, a decision out).

* A valid token as ``Authorization: Bearer T`` allows everything (scripts, ``curl``).
* A valid token in the ``blobmesh_token`` cookie (set when the page is opened with
  ``?token=T``) or in that query allows reads, and writes only from the page's own origin.
* Without a token, only a loopback listener is usable, and only when the ``Host`` header names
  a loopback address (so a DNS-rebinding page cannot reach it): reads from anyone, writes only
  same-origin.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from blobmesh.errors import BlobmeshError

COOKIE = "blobmesh_token"
TOKEN_FILE = "dashboard.token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class DashboardTokenError(BlobmeshError):
    """The dashboard token file is unreadable or too short."""

    exit_code = 2


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``, no port) is a loopback one."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_of(host_header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:80`` -> ``::1``)."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if host_header.count(":") == 1 else host_header


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str = ""
    set_cookie: bool = False  # the request brought the token in its query: remember it


@dataclass(frozen=True, slots=True)
class Policy:
    token: str
    loopback_listener: bool

    def decide(self, method: str, headers: Mapping[str, str], cookies: Mapping[str, str],
               query: Mapping[str, str]) -> Decision:
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer ") and self._ok(auth[7:].strip()):
            return Decision(True)
        host = headers.get("Host", "")
        same_origin = headers.get("Origin") in (f"http://{host}", f"https://{host}")
        write = method.upper() not in SAFE_METHODS
        from_query = self._ok(query.get("token", ""))
        if from_query or self._ok(cookies.get(COOKIE, "")):
            if write and not same_origin:
                return Decision(False, "a write with the cookie token must come from this page")
            return Decision(True, set_cookie=from_query)
        if not self.loopback_listener:
            return Decision(False, "this listener requires a token (Authorization: Bearer)")
        if not is_loopback(host_of(host)):
            return Decision(False, f"Host {host!r} is not a loopback name")
        if write and not same_origin:
            return Decision(False, "a write without a token must come from this page")
        return Decision(True)

    def _ok(self, presented: str) -> bool:
        return bool(presented) and hmac.compare_digest(presented.encode(), self.token.encode())


def load_or_create_token(home: Path) -> str:
    """The token in ``HOME/dashboard.token``, created (mode 0600) when missing."""
    path = home / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(24)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(token + "\n")
        return token
    except OSError as exc:
        raise DashboardTokenError(f"cannot read {path}: {exc.strerror}") from exc
    if len(token) < 16:
        raise DashboardTokenError(f"the token in {path} is shorter than 16 characters")
    return token
