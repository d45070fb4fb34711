"""``node run`` settings from three layers: built-in defaults, a TOML file
(``HOME/config.toml`` or ``--config FILE``), then command-line flags, which win.

Every option is declared once in :data:`OPTIONS`: its TOML key is its flag without the dashes,
with ``_`` for ``-`` (``--upload-rate`` is ``upload_rate``).  Repeatable flags are lists in the
file (``group = ["edge", "gpu"]``); a flag given replaces the file's list.  Two tables have no
flags: ``[timing]`` (the space's failure detection and gossip periods, :class:`Timing`) and
``[swarm]`` (:class:`SwarmConfig`'s limits), keyed by their field names.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blobmesh.errors import BlobmeshError
from blobmesh.node.logs import FORMATS, LEVELS

if TYPE_CHECKING:
    from blobmesh.node.daemon import NodeConfig

CONFIG_NAME = "config.toml"


class ConfigFileError(BlobmeshError):
    """The config file cannot be read or holds a bad setting."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class Option:
    """One ``node run`` setting."""

    key: str
    type: type
    default: Any
    help: str
    metavar: str | None = None
    repeat: bool = False
    choices: tuple[str, ...] | None = None
    minimum: float | None = None  # numbers: the least value accepted
    exclusive: bool = False  # ... and the minimum itself is not

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("listen", str, "127.0.0.1:0", "address to listen on; port 0 reuses the port of the "
           "last run when free, else picks one", "HOST:PORT"),
    Option("bootstrap", str, [], "a peer's ticket to join through (repeatable)", "TICKET",
           repeat=True),
    Option("group", str, [], "a group (formation) this node belongs to (repeatable)", "G",
           repeat=True),
    Option("cap", str, [], "a capability such as gpu=true or mem_gb=64 (repeatable)",
           "KEY=VALUE", repeat=True),
    Option("space", str, None, "name of the space to join (default: the bootstrap "
           "ticket's, else blobmesh)", "NAME"),
    Option("secret_file", Path, None, "file holding the space's shared secret (at least 16 "
           "bytes; keep it mode 0600; default: the ticket's, else one kept in the home, made "
           "on first run)", "FILE"),
    Option("open", bool, False, "an open space: no secret, anyone who knows its name may "
           "join"),
    Option("distributor", str, [], "accept distributions only from this node (repeatable; "
           "default: from any member)", "NODE_ID", repeat=True),
    Option("upload_rate", float, 0.0, "cap on swarm upload bytes per second (0: unlimited)",
           "BYTES_PER_S", minimum=0),
    Option("download_rate", float, 0.0, "cap on swarm download bytes per second "
           "(0: unlimited)", "BYTES_PER_S", minimum=0),
    Option("mdns", bool, False, "discover peers on the LAN"),
    Option("metrics_listen", str, None, "also serve /metrics over HTTP for Prometheus at this "
           "address; a bare PORT means 127.0.0.1:PORT (expose it beyond loopback only behind "
           "a firewall)", "[HOST:]PORT"),
    Option("http_listen", str, None, "serve the web dashboard and the JSON API over HTTP here "
           "(off by default; a non-loopback address needs the token in HOME/dashboard.token)",
           "HOST:PORT"),
    Option("want_peers", int, 8, "redial remembered peers and bootstrap tickets, backing off, "
           "while fewer peers are alive", "N", minimum=0),
    Option("log_level", str, "info", "least severe log records shown on stderr",
           choices=LEVELS),
    Option("log_format", str, "text", "one text line or one JSON object per record",
           choices=FORMATS),
)


def _table(cls: type, *, periods: bool, skip: frozenset[str] = frozenset()) -> dict[str, Option]:
    """A dataclass's numeric fields as options of one table.  ``periods``: its floats are
    periods, above 0, and its counts at least 0; else its counts (pipelines, slots, limits) are
    at least 1 and its floats at least 0."""
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name in skip or isinstance(default, bool) or not isinstance(default, int | float):
            continue
        count = isinstance(default, int)
        out[f.name] = Option(f.name, type(default), default, "",
                             minimum=1 if count and not periods else 0,
                             exclusive=periods and not count)
    return out


@functools.cache
def tables() -> dict[str, dict[str, Option]]:
    """The file's ``[name]`` tables: no flags, every key a field of the class (imported
    here, so that building the CLI's parsers does not load the space and the swarm)."""
    from blobmesh.distribution.config import SwarmConfig
    from blobmesh.space.config import Timing

    return {
        "timing": _table(Timing, periods=True),
        # the rates are flags (--upload-rate, --download-rate), so not here too
        "swarm": _table(SwarmConfig, periods=False,
                        skip=frozenset({"upload_rate", "download_rate"})),
    }


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Add every option as a flag whose unset value is None (so the file's value shows)."""
    for o in OPTIONS:
        default = "off" if o.type is bool else o.default
        if isinstance(default, float):
            default = f"{default:g}"  # 0, not Python's 0.0
        shown = f" (default: {default})" if default not in (None, []) else ""
        if o.type is bool:
            p.add_argument(o.flag, action="store_true", default=None, help=o.help + shown)
        else:
            p.add_argument(o.flag, type=_flag_type(o), default=None, metavar=o.metavar,
                           choices=o.choices, action="append" if o.repeat else "store",
                           help=o.help + shown)


def _flag_type(o: Option) -> Callable[[str], Any]:
    """How argparse reads the flag: its type, and no less than its minimum."""
    if o.minimum is None:
        return o.type

    def number(text: str) -> Any:
        try:
            value = o.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {_a_number(o)}: {text!r}") from None
        if value < o.minimum:
            raise argparse.ArgumentTypeError(f"must be at least {o.minimum:g}, not {text}")
        return value

    number.__name__ = o.type.__name__  # argparse names the type in its messages
    return number


def _a_number(o: Option) -> str:
    return "an integer" if o.type is int else "a number"


def load_file(path: Path) -> dict[str, Any]:
    """The settings in a TOML file, type-checked against :data:`OPTIONS`."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror or exc}",
                              path=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"config file {path}: {exc}", path=str(path)) from exc
    return _settings(path, raw, {o.key: o for o in OPTIONS}, top=True)


def _settings(path: Path, raw: dict[str, Any], known: dict[str, Option], *, top: bool,
              where: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if top and key in tables():
            if not isinstance(value, dict):
                raise ConfigFileError(f"config file {path}: {key} must be a table "
                                      f"([{key}]), not {value!r}", path=str(path))
            out[key] = _settings(path, value, tables()[key], top=False, where=f"{key}.")
            continue
        o = known.get(key)
        if o is None:
            names = sorted(known) + ([f"[{t}]" for t in tables()] if top else [])
            raise ConfigFileError(f"config file {path}: unknown setting '{where}{key}' "
                                  f"(known: {', '.join(names)})", path=str(path))
        out[key] = _check(path, o, value, where)
    return out


def _check(path: Path, o: Option, value: Any, where: str = "") -> Any:
    def bad(want: str) -> ConfigFileError:
        return ConfigFileError(f"config file {path}: {where}{o.key} must be {want}, not "
                               f"{value!r}", path=str(path))

    if o.repeat:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return value
    if o.type is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if o.type in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                (o.type is int and not isinstance(value, int)):
            raise bad(_a_number(o))
        if o.minimum is not None and o.exclusive and value <= o.minimum:
            raise bad(f"more than {o.minimum:g}")
        if o.minimum is not None and value < o.minimum:
            raise bad(f"at least {o.minimum:g}")
        return o.type(value)
    if not isinstance(value, str):
        raise bad("a string")
    if o.choices and value not in o.choices:
        raise bad(" or ".join(o.choices))
    return Path(value).expanduser() if o.type is Path else value


def resolve(home: Path, args: argparse.Namespace) -> tuple[dict[str, Any], Path | None]:
    """The effective settings (defaults < file < flags) and the file used, if any."""
    path: Path | None = getattr(args, "config", None)
    if path is None and (home / CONFIG_NAME).exists():
        path = home / CONFIG_NAME
    values = {o.key: o.default for o in OPTIONS}
    if path is not None:
        values.update(load_file(path))
    for o in OPTIONS:
        flag = getattr(args, o.key, None)
        if flag is not None:
            values[o.key] = flag
    if getattr(args, "verbose", False):
        values["log_level"] = "debug"
    return values, path


@dataclass(frozen=True, slots=True)
class RunSettings:
    """What ``node run`` runs with: the node's config and the process's logging."""

    node: NodeConfig
    log_level: str
    log_format: str
    config_file: Path | None


def node_settings(home: Path, args: argparse.Namespace) -> RunSettings:
    """Settings for ``node run`` (the daemon is imported here: it pulls in the whole stack)."""
    from blobmesh.node.daemon import NodeConfig
    from blobmesh.transport.ticket import parse_listen_address

    v, path = resolve(home, args)
    config = NodeConfig.from_cli(
        home, listen=v["listen"], bootstrap=v["bootstrap"], groups=v["group"], caps=v["cap"],
        space=v["space"], secret_file=v["secret_file"], upload_rate=v["upload_rate"],
        download_rate=v["download_rate"], mdns=v["mdns"], open_space=v["open"],
        distributors=v["distributor"])
    config.want_peers = v["want_peers"]
    config.timing = dataclasses.replace(config.timing, **v.get("timing", {}))
    config.swarm = dataclasses.replace(config.swarm, **v.get("swarm", {}))
    if v["metrics_listen"]:
        config.metrics_listen = parse_listen_address(_loopback_default(v["metrics_listen"]))
    if v["http_listen"]:
        config.http_listen = parse_listen_address(v["http_listen"])
    return RunSettings(config, v["log_level"], v["log_format"], path)


def _loopback_default(text: str) -> str:
    """``9464`` and ``:9464`` mean loopback: metrics are not for the whole network."""
    text = text.strip()
    return f"127.0.0.1:{text.lstrip(':')}" if text.lstrip(":").isdigit() else text
