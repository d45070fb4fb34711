"""``blobmesh ticket``."""

from __future__ import annotations

from pathlib import Path

import pytest

from blobmesh.cli.main import main
from blobmesh.transport import Identity, NodeId, Ticket


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
    assert Ticket.parse(capsys.readouterr().out).node_id == ticket.node_id


def test_ticket_command_rejects_open_key(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    Identity.load_or_create(tmp_path)
    (tmp_path / "identity.key").chmod(0o644)
    with pytest.raises(SystemExit) as info:
        main(["--home", str(tmp_path), "ticket"])
    assert info.value.code == 1
    assert "chmod 600" in capsys.readouterr().err
