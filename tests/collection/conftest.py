"""A sample tree with everything a collection records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def make_tree(root: Path) -> Path:
    (root / "model" / "shards").mkdir(parents=True)
    (root / "model" / "shards" / "00.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    (root / "model" / "config.json").write_text('{"layers": 2}')
    (root / "empty" / "nested").mkdir(parents=True)
    (root / "bin").mkdir()
    run = root / "bin" / "run.sh"
    run.write_text("#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    (root / "ünïcødé ✓.txt").write_text("names in any script")
    (root / "zero").write_bytes(b"")
    (root / "model" / "latest").symlink_to("shards/00.bin")
    (root / "bin" / "cfg").symlink_to("../model/config.json")
    (root / "dangling").symlink_to("nowhere")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")
