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
from tests.cli import schemas

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
    listing = [schemas.check(e, schemas.Added) for e in cli.json("add", *files)]
    listing_json = cli.json("add", *files)
    assert [(e["blob"], e["size"], e["path"], e["complete"]) for e in listing_json] == [
        (ids[0], len(DATA), str(files[0]), True), (ids[1], 5, str(files[1]), True)]
    assert [e.blob for e in listing] == ids


def test_read_commands(cli: Cli, files: list[Path], tmp_path: Path) -> None:
    blob = cli.out("add", "-q", "--pin", "data/latest", files[0]).strip()
    assert cli.run("cat", blob).stdout == DATA
    cli.run("export", blob, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == DATA
    info = cli.json("info", blob)
    schemas.check(info, schemas.BlobInfo)
    assert (info["blob"], info["size"], info["pins"]) == (blob, len(DATA), ["data/latest"])
    assert cli.json("info", blob[:12]) == info  # a unique prefix will do
    human = cli.out("info", blob)
    assert "complete: true" in human and "created: 20" in human and "KiB" in human
    assert f"id: {blob}" in cli.out("info", blob)
    ls = cli.out("ls").splitlines()
    assert len(ls) == 1 and ls[0].startswith(blob) and "pins: data/latest" in ls[0]
    listing = cli.json("ls")
    assert [schemas.check(e, schemas.BlobInfo).blob for e in listing] == [blob]
    refused = cli.run("export", blob[:10], tmp_path / "out.bin", ok=False)
    assert refused.returncode == 1 and b"exists (use --force" in refused.stderr
    (tmp_path / "out.bin").write_bytes(b"old")
    cli.run("export", blob[:10], tmp_path / "out.bin", "--force")
    assert (tmp_path / "out.bin").read_bytes() == DATA


def test_pins_and_gc(cli: Cli, files: list[Path]) -> None:
    kept, dropped = cli.out("add", "-q", *files).split()
    assert cli.out("pin", kept, "keep").strip() == f"pinned {kept} as keep"
    pins = cli.json("pins")
    assert [schemas.check(p, schemas.Pin).name for p in pins] == ["keep"]
    assert [(p["name"], p["blob"]) for p in pins] == [("keep", kept)]
    assert cli.out("pins").split() == ["keep", kept]
    dry = cli.json("gc", "--dry-run")
    schemas.check(dry, schemas.Gc)
    assert dry["deleted"] == [dropped] and dry["dry_run"]
    assert "deleted 1 blob(s)" in cli.out("gc")
    assert [e["blob"] for e in cli.json("ls")] == [kept]
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
    schemas.check(report, schemas.Fsck)
    assert report["repaired"]
    assert [(p["kind"], p["blob"]) for p in report["problems"]] == [("corrupt", blob)]
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


def test_ambiguous_and_unknown_prefixes(cli: Cli, tmp_path: Path) -> None:
    paths = []
    for i in range(33):  # 33 ids, 32 base32 digits after bm1: two share their first one
        paths.append(tmp_path / f"{i}.bin")
        paths[-1].write_bytes(b"%d" % i)
    ids = cli.out("add", "-q", *paths).split()
    prefix = next(i[:4] for i in ids if sum(j.startswith(i[:4]) for j in ids) > 1)
    proc = cli.run("info", prefix, ok=False)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.count("\n") == 1
    assert f"'{prefix}' is ambiguous" in err and "blobs match" in err
    digits = "abcdefghijklmnopqrstuvwxyz234567"
    unknown = next(f"bm1{a}{b}" for a in digits for b in digits
                   if not any(i.startswith(f"bm1{a}{b}") for i in ids))
    proc = cli.run("cat", unknown, ok=False)
    assert proc.returncode == 2 and b"nor is it the prefix of a blob" in proc.stderr
