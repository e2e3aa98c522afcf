"""`settler` command line: parses arguments, loads settings once, calls in.

Each command group lives in settler/commands/<name>.py with a `register(subparsers)`
that adds its parser and sets `handler(args, settings) -> exit code`.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from settler import __version__
from settler.config import ConfigError, load_settings

COMMAND_MODULES = (
    "settler.commands.run",
    "settler.commands.schema",
    "settler.commands.dev",
    "settler.commands.balances",
    "settler.commands.api",
    "settler.commands.keys",
    "settler.commands.replay",
    "settler.commands.verify",
    "settler.commands.dlq",
    "settler.commands.sample",
    "settler.commands.status",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line naming what is wrong, exit 2 (argparse's usage dump is noise in logs).
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="settler", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--version", action="version", version=f"settler {__version__}")
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help="TOML file of settings (SETTLER_* environment variables override it)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a command group not built yet
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"settler: {exc}", file=sys.stderr)
        return 2
    try:
        code: int = args.handler(args, settings)
    except ConfigError as exc:
        # Clients torn down on the way out may leave futures whose errors the event loop
        # logs when they are collected: collect them now, so the one line comes last.
        gc.collect()
        print(f"settler: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
