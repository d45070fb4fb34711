"""Closed by default: the space secret, kept in the home and carried by join tickets."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobmesh.errors import SpaceConfigError
from blobmesh.node.client import NodeClient
from blobmesh.space.secret import SECRET_FILE, SECRET_SIZE, join_secret, space_of
from blobmesh.transport import Identity, Ticket
from tests.util import eventually

ME = Ticket.create(Identity.generate().node_id, [("127.0.0.1", 4919)])


def test_a_new_space_gets_a_random_secret_kept_in_the_home(tmp_path: Path) -> None:
    first = join_secret(tmp_path, space="s", secret=None, tickets=(), open_space=False)
    assert first is not None and len(first) == SECRET_SIZE
    assert stat.S_IMODE((tmp_path / SECRET_FILE).stat().st_mode) == 0o600
    assert join_secret(tmp_path, space="s", secret=None, tickets=(), open_space=False) == first
    other = join_secret(tmp_path / "b", space="s", secret=None, tickets=(), open_space=False)
    assert other != first


def test_the_ticket_secret_wins_and_is_kept(tmp_path: Path) -> None:
    ticket = ME.for_space("s", b"t" * 32)
    got = join_secret(tmp_path, space="s", secret=None, tickets=(ticket,), open_space=False)
    assert got == b"t" * 32 == (tmp_path / SECRET_FILE).read_bytes()
    # a restart without the ticket stays in the space
    assert join_secret(tmp_path, space="s", secret=None, tickets=(), open_space=False) == got
    # a secret file wins over the kept one, and must agree with a ticket's
    assert join_secret(tmp_path, space="s", secret=b"f" * 16, tickets=(),
                       open_space=False) == b"f" * 16
    assert join_secret(tmp_path, space="s", secret=b"t" * 32, tickets=(ticket,),
                       open_space=False) == b"t" * 32
    assert space_of((ticket,)) == "s" and space_of(()) == "blobmesh"


@pytest.mark.parametrize(("kw", "match"), [
    ({"open_space": True, "secret": b"f" * 16}, "--open"),
    ({"open_space": True, "tickets": (ME.for_space("s", b"t" * 32),)}, "--open"),
    ({"tickets": (ME.for_space("s", None),)}, "run with --open"),
    ({"tickets": (ME.for_space("other", b"t" * 32),)}, "space 'other'"),
    ({"tickets": (ME.for_space("s", b"t" * 32), ME.for_space("s", b"u" * 32))},
     "different secrets"),
    ({"secret": b"f" * 16, "tickets": (ME.for_space("s", b"t" * 32),)}, "another secret"),
])
def test_contradictions_are_config_errors(tmp_path: Path, kw: dict[str, object],
                                          match: str) -> None:
    args: dict[str, object] = {"space": "s", "secret": None, "tickets": (),
                               "open_space": False, **kw}
    with pytest.raises(SpaceConfigError, match=match):
        join_secret(tmp_path, **args)  # type: ignore[arg-type]


def test_open_space_has_no_secret(tmp_path: Path) -> None:
    assert join_secret(tmp_path, space="s", secret=None, tickets=(ME.for_space("s", None),),
                       open_space=True) is None
    assert not (tmp_path / SECRET_FILE).exists()


# --- real node processes ---------------------------------------------------------------------


class Procs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []

    def run(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        home = self.root / name
        cmd = [sys.executable, "-m", "blobmesh.cli.main", "--home", str(home), "node", "run",
               "--listen", "127.0.0.1:0", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def start(self, name: str, *args: str) -> str:
        """Start a node; its ticket."""
        proc = self.run(name, *args)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        assert line, proc.stderr.read().decode() if proc.stderr else ""
        return line

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop()


async def peers(home: Path) -> set[str]:
    async with NodeClient(home) as client:
        return {p["node"] for p in await client.peers() if p["alive"]}


async def test_closed_by_default_ticket_joins_stranger_refused(procs: Procs) -> None:
    ticket_a = Ticket.parse(procs.start("a"))
    assert ticket_a.space == "blobmesh" and ticket_a.secret is not None
    assert stat.S_IMODE((procs.root / "a" / SECRET_FILE).stat().st_mode) == 0o600
    # a stranger knows where a listens and its space's name, not the secret
    bare = Ticket.create(ticket_a.node_id, ticket_a.addrs)
    stranger = Ticket.parse(procs.start("stranger", "--bootstrap", str(bare)))
    friend = Ticket.parse(procs.start("friend", "--bootstrap", str(ticket_a)))
    a = procs.root / "a"

    async def a_sees_friend() -> bool:
        return str(friend.node_id) in await peers(a)

    await eventually(a_sees_friend, 30)
    await asyncio.sleep(1.0)  # the stranger keeps trying meanwhile
    assert await peers(a) == {str(friend.node_id)}
    assert await peers(procs.root / "stranger") == set()
    assert str(stranger.node_id) not in await peers(procs.root / "friend")
    async with NodeClient(a) as client:
        metrics = await client.metrics()
    refused = next(line for line in metrics.splitlines()
                   if line.startswith("blobmesh_space_admission_refused_total"))
    assert float(refused.split()[-1]) >= 1
    for name in ("blobmesh_transport_connected_peers", "blobmesh_space_admission_accepted_total",
                 "blobmesh_transport_connections_refused_total",
                 "blobmesh_transfer_refused_unadmitted_total"):
        assert f"\n{name} " in metrics
    stranger_proc = procs.procs[1]
    stranger_proc.terminate()
    err = stranger_proc.communicate(timeout=15)[1].decode()
    assert "join with the ticket" in err  # told once what went wrong, not once per retry
    assert err.count("refused us") <= 2 and "Traceback" not in err  # one per 10 s


async def test_open_space_needs_open_on_both_sides(procs: Procs) -> None:
    ticket = procs.start("o1", "--open")
    assert Ticket.parse(ticket).secret is None
    closed = procs.run("closed", "--bootstrap", ticket)
    assert closed.wait(30) == 2
    assert closed.stderr is not None and b"--open" in closed.stderr.read()
    joined = Ticket.parse(procs.start("o2", "--open", "--bootstrap", ticket))

    async def joins() -> bool:
        return str(joined.node_id) in await peers(procs.root / "o1")

    await eventually(joins, 30)
