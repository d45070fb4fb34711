"""Node log records as text or one JSON object per line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from blobmesh.node.logs import configure_logging


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_time_level_logger_message_and_error() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    log = logging.getLogger("blobmesh.test")
    log.debug("hidden")
    log.info("peer %s joined", "nd1x")
    try:
        raise OSError("disk gone")
    except OSError:
        log.exception("store failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "peer nd1x joined" and first["level"] == "info"
    assert first["logger"] == "blobmesh.test" and first["time"].endswith("+00:00")
    assert second["level"] == "error" and "OSError: disk gone" in second["error"]


def test_text_lines_and_levels() -> None:
    out = io.StringIO()
    configure_logging("warning", "text", out)
    logging.getLogger("blobmesh.test").info("quiet")
    logging.getLogger("blobmesh.test").warning("loud")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith("WARNING blobmesh.test: loud")
