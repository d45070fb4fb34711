"""``add DIR``, ``ls``/``info``, ``cat ID/path``, ``export`` and pins of collections via the
real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import schemas
from tests.cli.test_store_cmds import Cli, cli  # noqa: F401 - the fixture
from tests.collection.conftest import make_tree


def test_collection_commands(cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    tree = make_tree(tmp_path / "tree")
    cid = cli.out("add", "-q", tree).strip()
    assert cid.startswith("bm1") and "\n" not in cid
    human = cli.out("add", tree)
    assert human.startswith(f"added {cid}") and "0 new blob(s)" in human
    [listed] = [b for b in cli.json("ls") if "collection" in b]
    assert listed["blob"] == cid
    assert listed["collection"]["files"] == 5 and listed["collection"]["complete"]
    assert "collection: 9 entries" in cli.out("ls")
    assert cli.json("info", cid)["collection"]["members_present"] == 5
    for entry in cli.json("ls"):  # the schemas of every JSON output
        schemas.check(entry, schemas.CollectionInfo if "collection" in entry else
                      schemas.BlobInfo)
    assert schemas.check(cli.json("info", cid), schemas.CollectionInfo).blob == cid
    [added] = [schemas.check(a, schemas.AddedCollection) for a in cli.json("add", tree)]
    assert (added.blob, added.path, added.files, added.new_blobs) == (cid, str(tree), 5, 0)
    assert cli.run("cat", f"{cid}/model/config.json").stdout == b'{"layers": 2}'
    assert cli.run("cat", f"{cid}/bin/cfg").stdout == b'{"layers": 2}'  # in-tree link
    missing = cli.run("cat", f"{cid}/no/such", ok=False)
    assert missing.returncode == 1
    assert missing.stderr.decode().strip() == "blobmesh: error: no 'no/such' in the collection"

    out = tmp_path / "out"
    cli.run("export", cid, out)
    assert (out / "bin" / "run.sh").stat().st_mode & 0o111
    again = cli.run("export", cid, out, ok=False)
    assert again.returncode == 1 and "exists (use --force" in again.stderr.decode()
    assert len(again.stderr.splitlines()) == 1
    cli.run("export", "--force", cid, out)

    cli.run("pin", cid, "model")
    assert cli.out("pins").splitlines() == [f"model  {cid}"]  # member pins stay out of sight
    assert "deleted 0 blob(s)" in cli.out("gc")
    assert cli.out("fsck").endswith(": ok\n")
    cli.run("unpin", "model")
    assert "deleted 6 blob(s)" in cli.out("gc")


def test_a_file_of_a_collection_by_id_prefix(cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    cid = cli.out("add", "-q", make_tree(tmp_path / "tree")).strip()
    assert cli.run("cat", f"{cid[:12]}/model/config.json").stdout == b'{"layers": 2}'
    unknown = "bm1" + next(c for c in "abcdefghijklmnopqrstuvwxyz234567" if c != cid[3]) * 4
    r = cli.run("cat", f"{unknown}/model/config.json", ok=False)
    assert r.returncode == 2 and b"nor is it the prefix of a blob" in r.stderr


def test_mixing_files_and_dirs_is_refused(cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    r = cli.run("add", tmp_path / "d", tmp_path / "f", ok=False)
    assert r.returncode == 1 and b"not both" in r.stderr and b"Traceback" not in r.stderr


def _whole(home: Path, cid: str, *, held: bool = True) -> None:
    """Every member of ``cid`` is in ``home`` and, if ``held``, a GC keeps them all (what
    ``info`` and ``gc`` show, checked in this process: every command started costs a second
    or more of imports)."""
    from blobmesh import collection
    from blobmesh.hashing import BlobId
    from blobmesh.store import Store

    with Store(home) as store:
        summary = collection.summarize(store, BlobId.parse(cid))
        assert summary.complete and summary.members_present == summary.members == 5
        assert not held or collection.gc(store).deleted == []  # held as get/<id>, by a load


@pytest.mark.slow
def test_get_push_share_load_move_whole_trees(cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    from blobmesh.collection import add_tree
    from blobmesh.store import Store
    from tests.transfer.test_cli_integration import Server, free_port

    with Store(cli.home) as store:  # `add DIR` has its own test: only the moves start commands
        cid = str(add_tree(store, make_tree(tmp_path / "tree")).collection_id)
    # get: the collection, then every member, exported as a tree
    server = Server(cli.home, free_port())
    try:
        fetcher = Cli(tmp_path / "getter")
        fetcher.run("get", cid, "--from", server.ticket, "-o", tmp_path / "got")
        assert (tmp_path / "got" / "model" / "config.json").read_text() == '{"layers": 2}'
        _whole(fetcher.home, cid)
        # push: the other way round, to a server that accepts pushes
        sink = Server(tmp_path / "sink", free_port(), "--accept-push")
        try:
            fetcher.run("push", cid, "--to", sink.ticket)
        finally:
            sink.stop()
        _whole(tmp_path / "sink", cid, held=False)
    finally:
        server.stop()
    # share + load through a share directory (file URLs)
    shares = tmp_path / "shares"
    assert "with 5 new member blob(s)" in cli.out("share", cid, "--dir", shares)
    loader = Cli(tmp_path / "loader")
    loader.run("load", cid, "--url", shares.as_uri())
    _whole(loader.home, cid)


def test_fsck_reports_missing_members_of_pinned_collections(cli: Cli,  # noqa: F811
                                                            tmp_path: Path) -> None:
    from blobmesh.collection import add_tree
    from blobmesh.store import Store

    with Store(cli.home) as store:
        cid = add_tree(store, make_tree(tmp_path / "tree")).collection_id
        store.pin(cid, "only-the-manifest")
        store.gc()  # a plain Store.gc: the members go
    r = cli.run("fsck", "--repair", ok=False)
    assert r.returncode == 1  # nothing to quarantine can bring members back
    assert f"collection-missing: {cid}: 5 of 5 member blob(s) missing\n" in r.stdout.decode()
