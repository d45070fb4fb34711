"""The store commands of the ``blobmesh`` CLI, run as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blobmesh.hashing import BlobId, hash_bytes

DATA = os.urandom(300_000)


class Cli:
    """``blobmesh --home HOME ...`` in a subprocess."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def run(self, *args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run([sys.executable, "-m", "blobmesh.cli.main", "--home",
                               str(self.home), *map(str, args)], capture_output=True,
                              timeout=60, check=False)
        if ok:
            assert proc.returncode == 0, proc.stderr.decode()
            assert b"Traceback" not in proc.stderr
        return proc

    def out(self, *args: str | Path) -> str:
        return self.run(*args).stdout.decode()

    def json(self, *args: str | Path) -> Any:
        return json.loads(self.out(*args, "--json"))


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "home")


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    a, b = tmp_path / "a.bin", tmp_path / "b [1].bin"  # rich markup must not eat names
    a.write_bytes(DATA)
    b.write_bytes(b"small")
    return [a, b]


def test_add_outputs(cli: Cli, files: list[Path]) -> None:
    ids = [str(hash_bytes(DATA)), str(hash_bytes(b"small"))]
    assert cli.out("add", "-q", *files).splitlines() == ids
    human = cli.out("add", *files).splitlines()
    assert [line.split()[:2] for line in human] == [["added", i] for i in ids]
    assert [line.endswith(str(f)) for line, f in zip(human, files, strict=True)] == [True, True]
    listing = cli.json("add", *files)
    assert isinstance(listing, list)
    assert [(e["id"], e["size"], e["path"], e["complete"]) for e in listing] == [
        (ids[0], len(DATA), str(files[0]), True), (ids[1], 5, str(files[1]), True)]


def test_read_commands(cli: Cli, files: list[Path], tmp_path: Path) -> None:
    blob = cli.out("add", "-q", "--pin", "data/latest", files[0]).strip()
    assert cli.run("cat", blob).stdout == DATA
    cli.run("export", blob, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == DATA
    info = cli.json("info", blob)
    assert isinstance(info, dict)
    assert (info["id"], info["size"], info["pins"]) == (blob, len(DATA), ["data/latest"])
    assert f"id: {blob}" in cli.out("info", blob)
    ls = cli.out("ls").splitlines()
    assert len(ls) == 1 and ls[0].startswith(blob) and "pins: data/latest" in ls[0]
    listing = cli.json("ls")
    assert isinstance(listing, list) and [e["id"] for e in listing] == [blob]


def test_pins_and_gc(cli: Cli, files: list[Path]) -> None:
    kept, dropped = cli.out("add", "-q", *files).split()
    assert cli.out("pin", kept, "keep").strip() == f"pinned {kept} as keep"
    pins = cli.json("pins")
    assert isinstance(pins, list) and [(p["name"], p["id"]) for p in pins] == [("keep", kept)]
    assert cli.out("pins").split() == ["keep", kept]
    dry = cli.json("gc", "--dry-run")
    assert isinstance(dry, dict) and dry["deleted"] == [dropped] and dry["dry_run"]
    assert "deleted 1 blob(s)" in cli.out("gc")
    assert [e["id"] for e in cli.json("ls")] == [kept]
    assert cli.out("unpin", "keep").strip() == f"unpinned keep ({kept})"
    report = cli.json("gc")
    assert isinstance(report, dict) and report["deleted"] == [kept]
    assert cli.json("ls") == []


def test_fsck(cli: Cli, files: list[Path]) -> None:
    blob = cli.out("add", "-q", "--pin", "p", files[0]).strip()
    assert cli.out("fsck").strip().endswith(": ok")
    data_path = cli.home / "blobs" / BlobId.parse(blob).hex[:2] / BlobId.parse(blob).hex
    with open(data_path, "r+b") as f:
        f.write(b"X")
    bad = cli.run("fsck", ok=False)
    assert bad.returncode == 1 and f"corrupt: {blob}" in bad.stdout.decode()
    assert cli.run("cat", blob, ok=False).returncode != 0
    report = cli.json("fsck", "--repair")
    assert isinstance(report, dict) and report["repaired"]
    assert [(p["kind"], p["id"]) for p in report["problems"]] == [("corrupt", blob)]
    assert cli.json("fsck") == {"checked": 0, "bytes_checked": 0, "ok": True,
                                "repaired": False, "problems": []}


@pytest.mark.parametrize(("args", "message"), [
    (["add", "/nonexistent/file"], "no such file: /nonexistent/file"),
    (["add", "{tmp}"], "contains the store home"),
    (["add", "-q", "--json", "{a}"], "exclude each other"),
    (["cat", "bm1xyz"], "malformed blob id 'bm1xyz'"),
    (["info", "zz" + "a" * 53], "must start with 'bm1'"),
    (["cat", str(BlobId(bytes(32)))], "is not in the store"),
    (["export", str(BlobId(bytes(32))), "{tmp}/out"], "is not in the store"),
    (["pin", str(BlobId(bytes(32))), "x"], "is not in the store"),
    (["unpin", "nope"], "no pin named 'nope'"),
])
def test_errors_are_one_line(cli: Cli, files: list[Path], tmp_path: Path, args: list[str],
                             message: str) -> None:
    argv = [a.format(tmp=tmp_path, a=files[0]) for a in args]
    proc = cli.run(*argv, ok=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and proc.stdout == b""
    assert err.startswith("blobmesh: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
