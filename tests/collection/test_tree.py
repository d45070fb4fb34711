"""Adding directory trees: what is recorded, dedup between versions, changing files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from blobmesh.collection import Dir, File, Symlink, add_tree, export_tree, read_collection
from blobmesh.errors import InvalidCollectionError, SourceChangedError, SourceError
from blobmesh.store import Store


def snapshot(root: Path) -> dict[str, tuple[str, object]]:
    """Everything export must reproduce: kinds, contents, exec bits, link targets."""
    out: dict[str, tuple[str, object]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", None)
            else:
                out[rel] = ("file", (p.read_bytes(), os.access(p, os.X_OK)))
    return out


def test_round_trip(tree: Path, tmp_path: Path) -> None:
    with Store(tmp_path / "home") as store:
        added = add_tree(store, tree)
        coll = read_collection(store, added.collection_id)
        kinds = {e.path: type(e) for e in coll.entries}
        assert kinds["empty/nested"] is Dir and "empty" not in kinds
        assert kinds["model/latest"] is Symlink and kinds["dangling"] is Symlink
        run = coll.find("bin/run.sh")
        assert isinstance(run, File) and run.executable
        cfg = coll.find("model/config.json")
        assert isinstance(cfg, File) and not cfg.executable
        assert added.new_blobs == 5  # shard, config, run.sh, unicode file, empty file
        export_tree(store, added.collection_id, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(tree)


def test_same_tree_same_id_and_v2_stores_only_new_blobs(tree: Path, tmp_path: Path) -> None:
    with Store(tmp_path / "home") as store:
        v1 = add_tree(store, tree)
        assert add_tree(store, tree).collection_id == v1.collection_id
        before = {b.blob_id for b in store.blobs()}
        (tree / "model" / "config.json").write_text('{"layers": 3}')
        (tree / "model" / "new.txt").write_text("added in v2")
        v2 = add_tree(store, tree)
        assert v2.collection_id != v1.collection_id
        assert v2.new_blobs == 2 and v2.new_bytes == len('{"layers": 3}') + len("added in v2")
        after = {b.blob_id for b in store.blobs()}
        assert len(after - before) == 3  # two files and the new collection


def test_escaping_symlink_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "d").mkdir(parents=True)
    (root / "d" / "big").write_bytes(b"x" * 1000)
    (root / "d" / "out").symlink_to("../../elsewhere")
    with Store(tmp_path / "home") as store:
        with pytest.raises(InvalidCollectionError, match="escapes the tree"):
            add_tree(store, root)
        assert store.blobs() == []
    (root / "d" / "out").unlink()
    (root / "d" / "out").symlink_to("/etc/passwd")
    with Store(tmp_path / "home") as store, pytest.raises(InvalidCollectionError,
                                                          match="absolute"):
        add_tree(store, root)


def test_special_files_and_missing_dirs_are_clear_errors(tmp_path: Path) -> None:
    with Store(tmp_path / "home") as store:
        with pytest.raises(SourceError, match="no such directory"):
            add_tree(store, tmp_path / "nope")
        root = tmp_path / "t"
        root.mkdir()
        os.mkfifo(root / "pipe")
        with pytest.raises(SourceError, match="not a regular file"):
            add_tree(store, root)


def test_a_file_growing_while_read_is_detected(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    log = root / "growing.log"
    log.write_bytes(os.urandom(48 * 1024 * 1024))
    stop = threading.Event()

    def append() -> None:
        with open(log, "ab") as f:
            while not stop.is_set():
                f.write(b"more\n")
                f.flush()

    writer = threading.Thread(target=append)
    writer.start()
    try:
        with Store(tmp_path / "home") as store:
            with pytest.raises(SourceChangedError, match=r"growing\.log changed while"):
                add_tree(store, root)
            assert not any(b.size < 1024 for b in store.blobs())  # no collection recorded
    finally:
        stop.set()
        writer.join()
