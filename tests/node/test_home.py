"""The home lock and the membership state a node persists."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from blobmesh.errors import HomeInUseError
from blobmesh.node.daemon import Node, NodeConfig
from blobmesh.node.home import MAX_REMEMBERED_PEERS, HomeLock, NodeState
from blobmesh.transport import Identity, Ticket


def test_one_holder_at_a_time(tmp_path: Path) -> None:
    first, second = HomeLock(tmp_path / "h"), HomeLock(tmp_path / "h")
    first.acquire()
    with pytest.raises(HomeInUseError, match=f"another node \\(pid {os.getpid()}\\) is running"):
        second.acquire()
    first.release()
    second.acquire()  # free again once released (or once the holder dies)
    second.release()


def test_state_round_trips_and_bad_files_are_ignored(tmp_path: Path) -> None:
    assert NodeState.load(tmp_path) == NodeState()
    tickets = [Ticket.create(Identity.generate().node_id, [("127.0.0.1", 4000 + i)])
               for i in range(MAX_REMEMBERED_PEERS + 5)]
    NodeState(listen_port=4919, peers=tickets, pruned=["d-0123456789abcdef"]).save(tmp_path)
    back = NodeState.load(tmp_path)
    assert back.listen_port == 4919 and back.pruned == ["d-0123456789abcdef"]
    assert [str(t) for t in back.peers] == [str(t) for t in tickets[:MAX_REMEMBERED_PEERS]]
    (tmp_path / "node-state.json").write_text('{"listen_port": "x"')
    assert NodeState.load(tmp_path) == NodeState()
    (tmp_path / "node-state.json").write_text('{"listen_port": 7, "peers": ["junk"]}')
    assert NodeState.load(tmp_path) == NodeState(listen_port=7)


def test_state_is_saved_owner_only_even_over_an_older_world_readable_one(tmp_path: Path) -> None:
    # before: 0644 (it holds peer tickets); a home from then, and a leftover temporary file
    for name in ("node-state.json", "node-state.tmp"):
        (tmp_path / name).write_text("{}")
        (tmp_path / name).chmod(0o644)
    NodeState(listen_port=4919).save(tmp_path)
    assert stat.S_IMODE((tmp_path / "node-state.json").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node-state.json"]
    assert NodeState.load(tmp_path).listen_port == 4919


async def test_everything_a_running_node_keeps_in_its_home_is_owner_only(tmp_path: Path) -> None:
    # before: blob files and databases 0644 in a 0755 home, readable by any local user
    home = tmp_path / "n"
    async with Node(NodeConfig(home=home)) as node:
        node.store.add_stream([os.urandom(300_000)])  # a blob file, its piece layer, WAL files
        node.state.save(home)
        paths = [home, *home.rglob("*")]
        modes = {str(p.relative_to(home)): stat.S_IMODE(p.lstat().st_mode) for p in paths}
    kinds = {p.name for p in paths}
    assert {"identity.key", "space.secret", "node-state.json", "node.lock", "control.sock",
            "store.sqlite", "space.sqlite", "transfer.sqlite", "pieces.sqlite"} <= kinds, kinds
    assert any(p.name.endswith(".pieces") for p in paths)
    dirs = {str(p.relative_to(home)) for p in paths if p.is_dir()}
    assert {k: oct(m) for k, m in modes.items() if m != (0o700 if k in dirs else 0o600)} == {}


async def test_node_keeps_its_port_and_picks_another_when_it_is_taken(tmp_path: Path) -> None:
    home = tmp_path / "n"
    async with Node(NodeConfig(home=home)) as node:
        port = node.endpoint.listen_address[1]
    assert NodeState.load(home).listen_port == port
    async with Node(NodeConfig(home=home)) as node:
        assert node.endpoint.listen_address[1] == port  # same ticket as before
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        async with Node(NodeConfig(home=home)) as node:
            moved = node.endpoint.listen_address[1]
    assert moved != port and NodeState.load(home).listen_port == moved
