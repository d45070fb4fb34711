"""Shared fixtures: a fresh store home per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blobmesh.store import Store


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def store(home: Path) -> Iterator[Store]:
    with Store(home) as s:
        yield s
