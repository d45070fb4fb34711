"""The callback-style service: never blocks the caller, reports through callbacks, joins cleanly."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from blobmesh.errors import LoadFailedError, ShareError
from blobmesh.shares import ShareService
from blobmesh.store import BlobReader, Store
from tests.shares.conftest import MiB, free_port

WAIT = 10.0


def test_share_then_load_through_callbacks(store: Store, dest: Store, share_root: Path,
                                           nginx: str) -> None:
    data = b"callback " * 100_000
    blob_id = store.add_bytes(data).blob_id
    shared = threading.Event()
    errors: list[Exception | None] = []

    def on_complete(err: Exception | None) -> None:
        errors.append(err)
        shared.set()

    with ShareService(store, share_root) as sharer:
        sharer.share_blob("doc", blob_id, on_complete)
        assert shared.wait(WAIT) and errors == [None]
        sharer.share_blob("../bad", blob_id, on_complete)  # reported, not raised
    assert str(errors[1]).startswith("invalid resource id '../bad'")
    assert sharer.metrics.shares == 2 and sharer.metrics.share_failures == 1

    got: list[bytes] = []
    failed: list[Exception] = []
    service = ShareService(dest)
    dead = f"http://127.0.0.1:{free_port()}/"

    def on_success(reader: BlobReader) -> None:
        got.append(reader.read())

    service.load_blob("doc", [dead, nginx], retry_timeout=0.01, on_success=on_success,
                      on_error=failed.append)
    service.load_blob(blob_id, [dead], max_tries=2, retry_timeout=0.01,
                      on_success=on_success, on_error=failed.append)
    service.join(WAIT)  # finishes both before returning
    assert got == [data]
    [err] = failed
    assert isinstance(err, LoadFailedError) and len(err.context["attempts"]) == 2
    assert (service.metrics.loads, service.metrics.load_failures) == (2, 1)
    with pytest.raises(ShareError, match="shut down"):
        service.load_blob(blob_id, [nginx], on_success=on_success, on_error=failed.append)


def test_a_failing_callback_does_not_stop_the_service(store: Store, share_root: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    blob_id = store.add_bytes(b"x" * MiB).blob_id
    done = threading.Event()

    def explode(err: Exception | None) -> None:
        raise RuntimeError("caller bug")

    with ShareService(store, share_root) as service:
        service.share_blob(None, blob_id, explode)
        service.share_blob(None, blob_id, lambda err: done.set())
        assert done.wait(WAIT)
    assert "share service callback" in caplog.text and "caller bug" in caplog.text
    with ShareService(store) as bare, pytest.raises(ShareError, match="without a share dir"):
        bare.share_blob(None, blob_id, explode)
