"""The ``blobmesh`` command line.

Errors are printed as one line (``blobmesh: error: ...``) with a non-zero exit; tracebacks are
shown only with ``BLOBMESH_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from blobmesh import __version__
from blobmesh.cli.output import HelpFormatter
from blobmesh.errors import BlobmeshError

HOME_HELP = "store home directory (default: $BLOBMESH_HOME or the user data dir)"

MODULES = ("store", "share", "net", "transfer", "node", "space", "dashboard", "sim",
           "completion")
"""The ``blobmesh.cli.<name>_cmds`` modules, in the order ``--help`` lists their commands."""

COMMAND_MODULES = {
    **dict.fromkeys(("add", "cat", "export", "ls", "info", "pin", "unpin", "pins", "gc",
                     "fsck"), "store"),
    **dict.fromkeys(("share", "unshare", "load"), "share"),
    "ticket": "net",
    **dict.fromkeys(("serve", "get", "push"), "transfer"),
    **dict.fromkeys(("node", "peers", "distribute", "distributions", "status", "cancel"),
                    "node"),
    "bootstrap-server": "space",
    **dict.fromkeys(("dashboard", "top"), "dashboard"),
    "sim": "sim",
    "completion": "completion",
}
"""Which module registers each command: ``blobmesh ls`` imports only the store commands, not
the network stack, aiohttp and the node client the others need (about 0.3 CPU seconds at every
start).  ``tests/cli/test_main.py`` checks it against what the modules register."""


def command_word(argv: Sequence[str]) -> str | None:
    """The command named on a command line (the first word that is no global option)."""
    words = iter(argv)
    for word in words:
        if word == "--home":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or only of the module that registers ``command``."""
    parser = argparse.ArgumentParser(
        prog="blobmesh", formatter_class=HelpFormatter,
        description="Store, move and distribute content-addressed blobs.")
    parser.add_argument("--version", action="version", version=f"blobmesh {__version__}")
    parser.add_argument("--home", type=Path, default=None, help=HOME_HELP)
    parser.add_argument("--json", dest="global_json", action="store_true",
                        help="machine-readable output, for commands that have it (also "
                             "accepted after the command)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    only = COMMAND_MODULES.get(command or "")
    for name in (only,) if only else MODULES:
        importlib.import_module(f"blobmesh.cli.{name}_cmds").register(sub)
    for p in subcommand_parsers(parser):
        p.formatter_class = HelpFormatter
        # global options are accepted after the subcommand too; SUPPRESS keeps a value
        # given before it when none is given after
        p.add_argument("--home", type=Path, default=argparse.SUPPRESS, help=HOME_HELP)
    return parser


def subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every (nested) subcommand parser under ``parser``."""
    out: list[argparse.ArgumentParser] = []
    for action in parser._actions:  # argparse offers no public walk of its tree
        if isinstance(action, argparse._SubParsersAction):
            for p in dict.fromkeys(action.choices.values()):
                out.append(p)
                out.extend(subcommand_parsers(p))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(command_word(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    if args.global_json:
        if not hasattr(args, "json"):
            parser.error(f"{args.command} has no JSON output")
        args.json = True
    handler = args.handler
    try:
        code: int = handler(args)
        return code
    except BlobmeshError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error worth a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        if os.environ.get("BLOBMESH_DEBUG"):
            raise
        where = f": {exc.filename}" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{where}", 1)
    return 1


def _fail(message: str, code: int) -> None:
    if os.environ.get("BLOBMESH_DEBUG") and sys.exc_info()[0] is not None:
        raise
    sys.stderr.write(f"blobmesh: error: {message}\n")
    sys.exit(code)


if __name__ == "__main__":
    sys.exit(main())
