"""A fleet of real node processes whose logs must hold no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blobmesh.node.fleet import Fleet


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path) as f:
        yield f
    assert f.tracebacks() == []
