"""The command line as a whole: every option explained, global options anywhere, completion."""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blobmesh.cli.completion_cmds import command_tree
from blobmesh.cli.main import (
    COMMAND_MODULES,
    MODULES,
    build_parser,
    command_word,
    subcommand_parsers,
)


def test_every_option_and_argument_has_help() -> None:
    parser = build_parser()
    missing = []
    for p in [parser, *subcommand_parsers(parser)]:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction | argparse._HelpAction):
                continue
            if not a.help:
                missing.append(f"{p.prog} {'/'.join(a.option_strings) or a.dest}")
    assert missing == []


def test_help_shows_defaults() -> None:
    parser = build_parser()
    text = {p.prog: " ".join(p.format_help().split()) for p in subcommand_parsers(parser)}
    assert "(default: 127.0.0.1:0)" in text["blobmesh node run"]
    assert re.search(r"\(default:? normal\)", text["blobmesh distribute"])
    assert "(default: 240)" not in text["blobmesh ls"]  # no defaults made up
    assert re.search(r"--window MIB .* \(default:? \d+\)", text["blobmesh serve"])


def test_no_option_shows_an_empty_or_python_default() -> None:
    parser = build_parser()
    for p in [parser, *subcommand_parsers(parser)]:
        text = " ".join(p.format_help().split())
        assert not re.search(r"\(default: \)|\(default:? (None|True|False|\[\])\)", text), p.prog


def test_global_options_go_before_or_after_the_subcommand(tmp_path: Path) -> None:
    parser = build_parser()
    assert parser.parse_args(["--home", "/a", "peers"]).home == Path("/a")
    assert parser.parse_args(["peers", "--home", "/b", "--json"]).home == Path("/b")
    assert parser.parse_args(["node", "run", "--home", "/c"]).home == Path("/c")
    assert parser.parse_args(["peers"]).home is None
    r = subprocess.run([sys.executable, "-m", "blobmesh.cli.main", "--home", str(tmp_path),
                        "--json", "ls"], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "[]\n")
    r = subprocess.run([sys.executable, "-m", "blobmesh.cli.main", "--json", "cat", "bm1x"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cat has no JSON output" in r.stderr


def test_completion_scripts_know_every_command() -> None:
    tree = command_tree(build_parser())
    assert "run" in tree["node"][0] and "--metrics-listen" in tree["node run"][1]
    for shell in ("bash", "zsh", "fish"):
        r = subprocess.run([sys.executable, "-m", "blobmesh.cli.main", "completion", shell],
                           capture_output=True, text=True, timeout=60, check=True)
        assert "distribute" in r.stdout
        assert ("-l to" if shell == "fish" else "--to") in r.stdout
        if shell == "bash":
            check = subprocess.run(["bash", "-c", r.stdout + """
COMP_WORDS=(blobmesh node r); COMP_CWORD=2; _blobmesh; echo "${COMPREPLY[@]}"
COMP_WORDS=(blobmesh distribute f --pr); COMP_CWORD=3; _blobmesh; echo "${COMPREPLY[@]}"
"""], capture_output=True, text=True, timeout=60)
            assert check.stdout.splitlines() == ["run", "--priority"], check.stderr


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_accepts_its_script(tmp_path: Path) -> None:
    script = tmp_path / "blobmesh.fish"
    script.write_text(subprocess.run(
        [sys.executable, "-m", "blobmesh.cli.main", "completion", "fish"],
        capture_output=True, text=True, timeout=60, check=True).stdout)
    subprocess.run(["fish", "--no-execute", str(script)], check=True, timeout=60)


def test_shipped_completion_scripts_are_current() -> None:
    contrib = Path(__file__).parents[2] / "contrib" / "completions"
    for shell in ("bash", "zsh", "fish"):
        r = subprocess.run([sys.executable, "-m", "blobmesh.cli.main", "completion", shell],
                           capture_output=True, text=True, timeout=60, check=True)
        assert (contrib / f"blobmesh.{shell}").read_text() == r.stdout, (
            f"regenerate: blobmesh completion {shell} > contrib/completions/blobmesh.{shell}")


def test_human_units_times_and_booleans() -> None:
    from blobmesh.cli.output import human_bytes, human_duration, human_time, human_value

    assert [human_bytes(n) for n in (5, 2048, 3 * 1024**3)] == ["5 B", "2.0 KiB", "3.0 GiB"]
    assert [human_duration(s) for s in (42, 187, 7500)] == ["42s", "3m07s", "2h05m"]
    assert human_time(0).startswith("1970-01-01T") or human_time(0).startswith("1969-12-31T")
    assert (human_value(True), human_value(False), human_value(3)) == ("true", "false", "3")


def test_each_command_is_registered_by_the_module_the_table_names() -> None:
    registered = {}
    for name in MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"blobmesh.cli.{name}_cmds").register(sub)
        registered.update(dict.fromkeys(sub.choices, name))
    assert registered == COMMAND_MODULES
    commands = {p.prog.split()[1] for p in subcommand_parsers(build_parser())}
    assert commands == set(COMMAND_MODULES)


def test_a_store_command_loads_neither_the_network_stack_nor_the_node_client() -> None:
    probe = ("import sys; from blobmesh.cli.main import build_parser, command_word; "
             "build_parser(command_word(['--home', 'h', 'ls', '--json'])); "
             "print(sorted(m for m in ('aiohttp', 'blobmesh.transport', 'blobmesh.transfer', "
             "'blobmesh.node.client', 'blobmesh.shares') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    assert command_word(["--home", "ls", "--json", "info", "x"]) == "info"
    assert command_word(["--home=h", "--version"]) is None
