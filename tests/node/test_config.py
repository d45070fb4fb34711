"""``node run`` settings: defaults < HOME/config.toml (or --config) < flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from blobmesh.cli.main import build_parser
from blobmesh.node.config import OPTIONS, ConfigFileError, node_settings, resolve, tables


def args_of(home: Path, *flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["--home", str(home), "node", "run", *flags])


def test_defaults_without_a_file(tmp_path: Path) -> None:
    values, path = resolve(tmp_path, args_of(tmp_path))
    assert path is None and values == {o.key: o.default for o in OPTIONS}


def test_file_then_flags_override_it(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        'listen = "127.0.0.1:4919"\ngroup = ["edge", "gpu"]\ncap = ["gpu=true"]\n'
        'upload_rate = 1000\nmdns = true\nlog_level = "warning"\n'
        'metrics_listen = "127.0.0.1:9464"\nwant_peers = 3\n')
    settings = node_settings(tmp_path, args_of(
        tmp_path, "--group", "core", "--upload-rate", "5", "--log-format", "json"))
    cfg = settings.node
    assert cfg.listen == ("127.0.0.1", 4919) and cfg.groups == ("core",)  # a flag replaces
    assert cfg.capabilities == {"gpu": True} and cfg.mdns and cfg.want_peers == 3
    assert cfg.swarm.upload_rate == 5 and cfg.metrics_listen == ("127.0.0.1", 9464)
    assert (settings.log_level, settings.log_format) == ("warning", "json")
    assert settings.config_file == tmp_path / "config.toml"
    bare = node_settings(tmp_path, args_of(tmp_path, "--metrics-listen", "9100"))
    assert bare.node.metrics_listen == ("127.0.0.1", 9100)  # loopback unless told otherwise
    verbose = node_settings(tmp_path, args_of(tmp_path, "-v"))
    assert verbose.log_level == "debug"


def test_timing_and_swarm_tables_set_the_space_and_the_swarm(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        "upload_rate = 1000\n[timing]\nsuspicion_timeout = 2\nindirect_probes = 0\n"
        "[swarm]\nmax_connections = 128\nreverify_after = 0\n")
    cfg = node_settings(tmp_path, args_of(tmp_path)).node
    assert cfg.timing.suspicion_timeout == 2.0 and isinstance(cfg.timing.suspicion_timeout,
                                                               float)
    assert cfg.timing.indirect_probes == 0 and cfg.timing.probe_interval == 1.0  # the rest kept
    assert cfg.swarm.max_connections == 128 and cfg.swarm.reverify_after == 0
    assert cfg.swarm.upload_rate == 1000 and cfg.swarm.pipeline == 16
    assert tables()["timing"].keys() >= {"probe_interval", "probe_timeout", "suspicion_timeout"}


def test_an_explicit_config_file_wins_over_the_home_one(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('space = "home"\n')
    other = tmp_path / "other.toml"
    other.write_text('space = "other"\n')
    cfg = node_settings(tmp_path, args_of(tmp_path, "--config", str(other)))
    assert cfg.node.space == "other"


@pytest.mark.parametrize(("text", "message"), [
    ('colour = "red"\n', "unknown setting 'colour'"),
    ("group = 'edge'\n", "group must be a list of strings"),
    ('upload_rate = "fast"\n', "upload_rate must be a number"),
    ("want_peers = 2.5\n", "want_peers must be an integer"),
    ('log_level = "loud"\n', "log_level must be debug or info or warning or error"),
    ("listen = \n", "config file"),
    ("upload_rate = -1\n", "upload_rate must be at least 0, not -1"),
    ("want_peers = -3\n", "want_peers must be at least 0, not -3"),
    ("timing = 3\n", r"timing must be a table \(\[timing\]\), not 3"),
    ("[timing]\nprobe_interval = 0\n", "timing.probe_interval must be more than 0, not 0"),
    ("[timing]\nprobe_every = 1\n", "unknown setting 'timing.probe_every'"),
    ("[swarm]\npipeline = 0\n", "swarm.pipeline must be at least 1, not 0"),
    ("[swarm]\nstall_timeout = 'long'\n", "swarm.stall_timeout must be a number"),
    ("[swarm]\nupload_rate = 5\n", "unknown setting 'swarm.upload_rate'"),  # a flag's
    ("[swarm]\n[swarm.x]\n", "swarm.x"),
])
def test_bad_files_are_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(ConfigFileError, match=message):
        resolve(tmp_path, args_of(tmp_path))


def test_the_readme_example_config_is_valid(tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    [example] = re.findall(r"```toml\n(.*?)```", readme, re.S)
    (tmp_path / "config.toml").write_text(example)
    values, path = resolve(tmp_path, args_of(tmp_path))
    assert path == tmp_path / "config.toml"
    assert values["group"] == ["edge"] and values["log_format"] == "json"


@pytest.mark.parametrize(("flags", "message"), [
    (["--upload-rate", "-1"], "--upload-rate: must be at least 0, not -1"),
    (["--want-peers", "-3"], "--want-peers: must be at least 0, not -3"),
    (["--want-peers", "many"], "--want-peers: not an integer: 'many'"),
])
def test_bad_flags_are_usage_errors(tmp_path: Path, flags: list[str], message: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        args_of(tmp_path, *flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_rates_show_their_default_as_people_write_it() -> None:
    from blobmesh.cli.main import subcommand_parsers

    [p] = [p for p in subcommand_parsers(build_parser()) if p.prog == "blobmesh node run"]
    text = " ".join(p.format_help().split())
    assert "(0: unlimited) (default: 0)" in text and "default: 0.0" not in text
