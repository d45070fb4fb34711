"""``blobmesh sim``, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def sim(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "blobmesh.cli.main", "sim", *map(str, args)],
                          capture_output=True, timeout=120, check=False)


def test_json_result_and_plots(tmp_path: Path) -> None:
    proc = sim("--nodes", "5", "--size-mib", "2", "--piece-kib", "256", "--seed", "3",
               "--json", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out["nodes"] == 5 and out["ratio"] >= 1.0 and out["completed"] == 5
    assert abs(out["ratio"] - out["t_all_s"] / out["bound_s"]) < 1e-3
    assert json.loads((tmp_path / "result.json").read_text())["t_all_s"] == out["t_all_s"]
    for name in ("completion_cdf", "source_upload", "control_msgs_per_node"):
        for ext in ("png", "svg"):
            assert (tmp_path / f"{name}.{ext}").stat().st_size > 1000


def test_human_output_and_bad_arguments() -> None:
    proc = sim("--nodes", "2", "--size-mib", "1")
    assert proc.returncode == 0 and b"x the bound" in proc.stdout
    bad = sim("--nodes", "0")
    assert bad.returncode == 2 and b"must be positive" in bad.stderr
    assert b"Traceback" not in bad.stderr


def test_importing_the_simulator_loads_no_plotting() -> None:
    code = "import sys, blobmesh.sim; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert out.stdout.strip() == b"False"
