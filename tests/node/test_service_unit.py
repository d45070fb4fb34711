"""``contrib/blobmesh.service``: a unit systemd accepts, running ``node run`` with options
the CLI has, stopped with SIGTERM (a graceful leave) and reloaded with SIGHUP."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from blobmesh.cli.main import build_parser

UNIT = Path(__file__).parents[2] / "contrib" / "blobmesh.service"


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def test_the_unit_runs_node_run_and_signals_as_the_node_expects() -> None:
    unit = service()
    argv = shlex.split(unit["ExecStart"])
    assert Path(argv[0]).name == "blobmesh" and argv[1:3] == ["node", "run"]
    args = build_parser().parse_args(argv[1:])  # every option it passes exists
    # settings belong in HOME/config.toml: a flag would win over the file on every SIGHUP
    assert argv[3:] == [] and args.log_format is None
    assert unit["KillSignal"] == "SIGTERM" and unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    home = dict(e.split("=", 1) for e in shlex.split(unit["Environment"]))["BLOBMESH_HOME"]
    assert home == "/var/lib/blobmesh" and home in unit["ReadWritePaths"].split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    unit = tmp_path / "blobmesh.service"  # the binary is where pip puts it, not here
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/blobmesh", "/bin/true"))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
