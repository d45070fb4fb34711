"""The main job (``./dev demo``) runs end to end on a small fleet."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_distributes_to_a_small_fleet() -> None:
    r = subprocess.run([sys.executable, "-m", "blobmesh.demo", "--nodes", "3", "--size-mb", "8"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "completed: 2/2 targets" in r.stdout
    assert r.stdout.count("verified") == 3  # the source's copy and both received copies
