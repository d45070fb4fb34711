"""Loading from shares: real nginx, a misbehaving server, deadlines and resume."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from blobmesh.errors import (
    BadShareDataError,
    DeadlineExceededError,
    InvalidResourceIdError,
    InvalidShareUrlError,
    LoadFailedError,
    ShareSourceError,
)
from blobmesh.shares import ShareManifest, ShareMetrics, load_blob
from blobmesh.store import Store
from tests.shares.conftest import FaultServer, MiB, free_port, shared_blob

PIECE = 256 * 1024


async def test_load_from_nginx_by_blob_id_and_resource_id(store: Store, dest: Store,
                                                          share_root: Path, nginx: str) -> None:
    blob_id, data = shared_blob(store, share_root, 3 * MiB + 1, "model")
    metrics = ShareMetrics()
    seen: list[tuple[int, int]] = []
    with await load_blob(dest, "model", [nginx], metrics=metrics,
                         progress=lambda done, total: seen.append((done, total))) as reader:
        assert reader.blob_id == blob_id
        assert reader.read() == data
    assert dest.has(blob_id)
    assert seen[0] == (0, len(data)) and seen[-1] == (len(data), len(data))
    assert (metrics.loads, metrics.tries, metrics.loaded_bytes) == (1, 1, len(data))
    with await load_blob(dest, blob_id, [nginx], metrics=metrics) as again:  # no network
        assert again.read(5) == data[:5]
    assert (metrics.loads, metrics.tries, metrics.load_failures) == (2, 1, 0)
    assert "blobmesh_shares_loaded_bytes_total 3145729" in metrics.prometheus_lines()


async def test_load_from_a_file_url_and_an_empty_blob(store: Store, dest: Store,
                                                      share_root: Path) -> None:
    blob_id, data = shared_blob(store, share_root, 1 * MiB + 3)
    empty_id, _ = shared_blob(store, share_root, 0)
    with await load_blob(dest, blob_id, [share_root.as_uri()]) as reader:
        assert reader.read() == data
    with await load_blob(dest, empty_id, [share_root.as_uri()]) as reader:
        assert reader.read() == b""


async def test_falls_back_across_urls_and_lists_every_attempt(
        store: Store, dest: Store, share_root: Path, nginx: str, faults: FaultServer) -> None:
    blob_id, data = shared_blob(store, share_root, 1 * MiB)
    dead = f"http://127.0.0.1:{free_port()}/"
    bad = [faults.url("404"), faults.url("500"), dead]
    with pytest.raises(LoadFailedError) as info:
        await load_blob(dest, blob_id, bad, max_tries=2, retry_timeout=0.05)
    err = info.value
    assert [(a.url, a.try_number) for a in err.context["attempts"]] == \
        [(u, n) for n in (1, 2) for u in bad]
    assert [a.status for a in err.context["attempts"][:3]] == [404, 500, None]
    assert "\n" not in str(err) and str(err).startswith(f"could not load {blob_id}")
    assert "HTTP 404" in str(err) and "HTTP 500" in str(err) and "cannot connect" in str(err)
    with await load_blob(dest, blob_id, [*bad, nginx], retry_timeout=0.05) as reader:
        assert reader.read() == data


@pytest.mark.parametrize(("mode", "why", "kept"), [
    ("close", "ClientPayloadError", 2),
    ("stall", "timed out", 2),
    ("corrupt", "piece 2 of .* failed verification", 3),  # piece 3 was fine
    ("truncate", "body ended 524288 bytes short", 2),
    ("other", "is the manifest of blob", 0),
])
async def test_misbehaving_servers_fail_typed_and_keep_good_pieces(
        store: Store, dest: Store, share_root: Path, faults: FaultServer, mode: str,
        why: str, kept: int) -> None:
    blob_id, data = shared_blob(store, share_root, 1 * MiB)
    faults.other = ShareManifest(store.add_bytes(b"another blob").blob_id, 12, PIECE)
    with pytest.raises(LoadFailedError, match=why) as info:
        await load_blob(dest, blob_id, [faults.url(mode)], max_tries=1, stall_timeout=0.3)
    [attempt] = info.value.context["attempts"]
    expected = BadShareDataError if mode in ("corrupt", "other") else ShareSourceError
    assert isinstance(attempt.error, expected)
    assert not dest.has(blob_id)
    assert kept == (dest.info(blob_id).pieces_present if kept else 0)
    with await load_blob(dest, blob_id, [faults.url("ok")]) as reader:
        assert reader.read() == data
    resumed = [r for m, p, r in faults.requests if m == "ok" and p.endswith("/data")]
    missing = {0: ["bytes=0-1048575"], 2: ["bytes=524288-1048575"],
               3: ["bytes=524288-786431"]}
    assert resumed == missing[kept]


async def test_a_server_ignoring_range_still_resumes(store: Store, dest: Store,
                                                     share_root: Path,
                                                     faults: FaultServer) -> None:
    blob_id, data = shared_blob(store, share_root, 1 * MiB)
    with pytest.raises(LoadFailedError):
        await load_blob(dest, blob_id, [faults.url("close")], max_tries=1)
    with await load_blob(dest, blob_id, [faults.url("norange")]) as reader:
        assert reader.read() == data


async def test_resource_manifest_for_another_resource_is_rejected(
        store: Store, dest: Store, share_root: Path, faults: FaultServer) -> None:
    shared_blob(store, share_root, 1000, "app")
    faults.other = ShareManifest(store.add_bytes(b"x").blob_id, 1, PIECE, "not-app")
    with pytest.raises(LoadFailedError, match="is the manifest of resource 'not-app'"):
        await load_blob(dest, "app", [faults.url("other")], max_tries=1)


async def test_deadline_keeps_partial_data_and_a_later_load_resumes_with_range(
        store: Store, dest: Store, share_root: Path, faults: FaultServer) -> None:
    blob_id, data = shared_blob(store, share_root, 4 * MiB)
    metrics = ShareMetrics()
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError) as info:
        await load_blob(dest, blob_id, [faults.url("stall")], deadline=started + 0.5,
                        stall_timeout=30, metrics=metrics)
    assert time.monotonic() - started < 2
    assert "8/16 pieces kept for a resume" in str(info.value)
    assert "(try 1): interrupted by the deadline" in str(info.value)
    assert dest.info(blob_id).pieces_present == 8
    assert (metrics.loads, metrics.load_failures, metrics.deadlines_exceeded) == (1, 1, 1)
    with await load_blob(dest, blob_id, [faults.url("ok")]) as reader:
        assert reader.read() == data
    ranges = [r for m, p, r in faults.requests if p.endswith("/data")]
    assert ranges == ["bytes=0-4194303", "bytes=2097152-4194303"]


async def test_retries_back_off_between_passes(dest: Store, faults: FaultServer) -> None:
    started = time.monotonic()
    with pytest.raises(LoadFailedError, match="in 3 tries"):
        await load_blob(dest, "thing", [faults.url("500")], max_tries=3, retry_timeout=0.1)
    assert time.monotonic() - started >= 0.1 + 0.2


async def test_bad_arguments_fail_before_any_network(dest: Store) -> None:
    with pytest.raises(InvalidResourceIdError):
        await load_blob(dest, "../../etc/passwd", ["http://127.0.0.1:1/"])
    with pytest.raises(InvalidShareUrlError, match="unsupported share URL"):
        await load_blob(dest, "x", ["ftp://example.com/"])
    with pytest.raises(InvalidShareUrlError, match="has no host"):
        await load_blob(dest, "x", ["http:///nohost"])
