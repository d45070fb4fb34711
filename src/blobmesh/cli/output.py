"""Human and JSON output helpers shared by CLI commands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeAlias

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_command(sub: Subcommands, name: str, handler: Callable[[argparse.Namespace], int],
                help: str, *, json_flag: bool = False) -> argparse.ArgumentParser:
    """Register a subcommand whose ``handler(args)`` returns the exit code."""
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(handler=handler)
    if json_flag:
        p.add_argument("--json", action="store_true",
                       help="machine-readable output on stdout (see docs/distribution.md)")
    return p


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default unless its help already says it (or it has none worth
    showing: unset, off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, [], "", argparse.SUPPRESS) \
                or action.option_strings == [] or isinstance(default, bool):
            return text
        return f"{text} (default: {default})"


def positive_float(text: str) -> float:
    """An argparse type: a number of seconds (or such) greater than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
    return value


def human_value(v: object) -> str:
    """A JSON-ish scalar as people write it: ``true``/``false``, not Python's ``True``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def caps_text(caps: Mapping[str, object]) -> str:
    """Capabilities as they are given to ``--cap``: ``gpu=true,mem_gb=64``."""
    return ",".join(f"{k}={human_value(v)}" for k, v in sorted(caps.items()))


def human_time(ts: float | None) -> str:
    """Unix seconds as local ISO-8601 with its offset, to the second."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def human_duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# in a pipe, rich would squeeze tables into 80 columns and cut ids: give them room instead
console = Console(width=None if sys.stdout.isatty() else 240)
err_console = Console(stderr=True)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class IecSpeedColumn(ProgressColumn):
    """Transfer speed in IEC units (rich's own column is decimal: MB/s beside MiB)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{human_bytes(speed)}/s",
                    style="progress.data.speed")


@contextmanager
def byte_progress(enabled: bool = True) -> Iterator[Progress]:
    """A rich progress display for byte counts (on stderr, so stdout stays scriptable)."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        IecSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not enabled,
    )
    with progress:
        yield progress
