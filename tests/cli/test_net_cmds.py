"""``blobmesh ticket``."""

from __future__ import annotations

from pathlib import Path

import pytest

from blobmesh.cli.main import main
from blobmesh.node.home import NodeState
from blobmesh.transport import Identity, NodeId, Ticket
from blobmesh.transport.endpoint import DEFAULT_PORT


def test_ticket_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    assert main(["--home", str(home), "ticket", "--addr", "10.0.0.7:4919",
                 "--addr", "[fd00::1]:5000"]) == 0
    ticket = Ticket.parse(capsys.readouterr().out)
    assert ticket.node_id == Identity.load_or_create(home).node_id
    assert ticket.addrs == (("10.0.0.7", 4919), ("fd00::1", 5000))
    assert main(["--home", str(home), "ticket", "--id"]) == 0
    assert NodeId.parse(capsys.readouterr().out) == ticket.node_id
    assert main(["--home", str(home), "ticket"]) == 0  # default addresses
    out = capsys.readouterr()
    assert Ticket.parse(out.out).node_id == ticket.node_id
    assert {port for _, port in Ticket.parse(out.out).addrs} == {DEFAULT_PORT}
    assert "no node is running" in out.err


def test_ticket_of_a_stopped_node_keeps_its_last_port(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    NodeState(listen_port=45123).save(tmp_path)  # what a node that ran here left
    assert main(["--home", str(tmp_path), "ticket"]) == 0
    assert {port for _, port in Ticket.parse(capsys.readouterr().out).addrs} == {45123}


def test_ticket_command_rejects_open_key(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    Identity.load_or_create(tmp_path)
    (tmp_path / "identity.key").chmod(0o644)
    with pytest.raises(SystemExit) as info:
        main(["--home", str(tmp_path), "ticket"])
    assert info.value.code == 1
    assert "chmod 600" in capsys.readouterr().err
