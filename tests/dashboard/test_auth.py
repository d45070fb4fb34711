"""Who may use the dashboard's listener."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from blobmesh.dashboard.auth import (
    COOKIE,
    DashboardTokenError,
    Policy,
    host_of,
    is_loopback,
    load_or_create_token,
)

TOKEN = "t" * 32
LOOP = Policy(TOKEN, loopback_listener=True)
WIDE = Policy(TOKEN, loopback_listener=False)
HOST = {"Host": "127.0.0.1:8080"}
SAME = {**HOST, "Origin": "http://127.0.0.1:8080"}


def test_hosts() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.1.2.3") and not is_loopback("0.0.0.0")
    assert not is_loopback("evil.example")
    assert host_of("[::1]:80") == "::1" and host_of("h:1") == "h" and host_of("h") == "h"


def test_non_loopback_listener_needs_the_token() -> None:
    assert not WIDE.decide("GET", HOST, {}, {}).allowed
    assert not WIDE.decide("GET", {**HOST, "Authorization": "Bearer wrong"}, {}, {}).allowed
    assert WIDE.decide("POST", {**HOST, "Authorization": f"Bearer {TOKEN}"}, {}, {}).allowed
    opened = WIDE.decide("GET", HOST, {}, {"token": TOKEN})
    assert opened.allowed and opened.set_cookie
    assert WIDE.decide("GET", HOST, {COOKIE: TOKEN}, {}).allowed
    # the cookie rides along on cross-site requests: writes need the page's origin
    assert not WIDE.decide("POST", HOST, {COOKIE: TOKEN}, {}).allowed
    assert not WIDE.decide("POST", {**HOST, "Origin": "http://evil"}, {COOKIE: TOKEN},
                           {}).allowed
    assert WIDE.decide("POST", SAME, {COOKIE: TOKEN}, {}).allowed


def test_loopback_listener_reads_freely_writes_same_origin() -> None:
    assert LOOP.decide("GET", HOST, {}, {}).allowed
    assert LOOP.decide("POST", SAME, {}, {}).allowed
    assert not LOOP.decide("POST", HOST, {}, {}).allowed
    assert not LOOP.decide("DELETE", {**HOST, "Origin": "http://evil.example"}, {}, {}).allowed
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1
    rebound = {"Host": "evil.example:8080", "Origin": "http://evil.example:8080"}
    assert not LOOP.decide("GET", rebound, {}, {}).allowed
    assert LOOP.decide("GET", {**rebound, "Authorization": f"Bearer {TOKEN}"}, {}, {}).allowed


def test_token_file_created_private_and_reused(tmp_path: Path) -> None:
    token = load_or_create_token(tmp_path)
    assert len(token) >= 16
    assert stat.S_IMODE((tmp_path / "dashboard.token").stat().st_mode) == 0o600
    assert load_or_create_token(tmp_path) == token
    (tmp_path / "dashboard.token").write_text("short\n")
    with pytest.raises(DashboardTokenError, match="shorter"):
        load_or_create_token(tmp_path)
