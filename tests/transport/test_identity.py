"""Identity key files, signatures and tickets."""

from __future__ import annotations

import base64
import contextlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blobmesh.errors import IdentityError, InvalidIdError
from blobmesh.transport import Identity, NodeId, Ticket, parse_address, verify_signature
from blobmesh.transport.identity import KEY_FILE
from blobmesh.transport.ticket import parse_listen_address


def test_created_once_private_and_reloaded(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = Identity.load_or_create(home)
    path = home / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(home).node_id == first.node_id
    assert os.listdir(home) == [KEY_FILE]  # no temp file left behind


def test_refuses_key_readable_by_others(tmp_path: Path) -> None:
    Identity.load_or_create(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o640)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load_or_create(tmp_path)


@pytest.mark.parametrize("content", [b"", b"not a key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"])
def test_refuses_malformed_key(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / KEY_FILE
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not a valid identity key"):
        Identity.load_or_create(tmp_path)


def test_sign_and_verify() -> None:
    a, b = Identity.generate(), Identity.generate()
    sig = a.sign(b"message")
    assert verify_signature(a.node_id, b"message", sig)
    assert not verify_signature(a.node_id, b"other message", sig)
    assert not verify_signature(b.node_id, b"message", sig)
    assert not verify_signature(a.node_id, b"message", sig[:10])


def test_ticket_round_trip() -> None:
    node = Identity.generate().node_id
    t = Ticket.create(node, [("127.0.0.1", 4000), ("::1", 5), ("Host.Example", 80),
                             ("127.0.0.1", 4000)])
    assert t.addrs == (("127.0.0.1", 4000), ("::1", 5), ("host.example", 80))
    text = str(t)
    assert text.startswith("bmt1") and text == text.lower()
    assert Ticket.parse(text) == t
    assert Ticket.parse(f"  {text.upper()}\n") == t


@pytest.mark.parametrize("bad", [
    "", "nd1abc", "bmt1", "bmt1!!!!", "bmt1aaaa", "bmt1" + "a" * 5000,
])
def test_ticket_parse_rejects(bad: str) -> None:
    with pytest.raises(InvalidIdError):
        Ticket.parse(bad)


def test_ticket_parse_rejects_damage() -> None:
    text = str(Ticket.create(Identity.generate().node_id, [("10.1.2.3", 4919)]))
    for damaged in (text[:-2], text + "a", text[:10] + text[11:]):
        with pytest.raises(InvalidIdError):
            Ticket.parse(damaged)


@pytest.mark.parametrize("addr", [("", 1), ("0.0.0.0", 1), ("h", 0), ("h", 65536),
                                  ("bad host", 1), ("-x.example", 1), ("224.0.0.1", 1)])
def test_ticket_rejects_bad_addresses(addr: tuple[str, int]) -> None:
    with pytest.raises(InvalidIdError):
        Ticket.create(NodeId(bytes(32)), [addr])
    with pytest.raises(InvalidIdError):
        Ticket.create(NodeId(bytes(32)), [])


def test_parse_address() -> None:
    assert parse_address("example.org:80") == ("example.org", 80)
    assert parse_address("[::1]:4919") == ("::1", 4919)
    for bad in ("example.org", "host:", ":80", "[::1]"):
        with pytest.raises(InvalidIdError):
            parse_address(bad)


@settings(max_examples=300, deadline=1000)
@given(st.text(max_size=200) | st.binary(max_size=150).map(
    lambda b: "bmt1" + base64.b32encode(b).decode().rstrip("=").lower()))
def test_ticket_parse_fuzz(text: str) -> None:
    with contextlib.suppress(InvalidIdError):
        Ticket.parse(text)


def test_parse_listen_address() -> None:
    assert parse_listen_address("0.0.0.0:4919") == ("0.0.0.0", 4919)
    assert parse_listen_address(":0") == ("0.0.0.0", 0)
    assert parse_listen_address("[::]:5") == ("::", 5)
    assert parse_listen_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen_address("LocalHost:80") == ("localhost", 80)
    for bad in ("0.0.0.0", "bad host:1", "1.2.3.4:70000"):
        with pytest.raises(InvalidIdError):
            parse_listen_address(bad)
