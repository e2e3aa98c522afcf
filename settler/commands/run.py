"""`settler run`: the worker."""

from __future__ import annotations

import argparse
from typing import Any

from settler.config import Settings, help_table


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="settle the event stream (long-running worker)",
        description="Settle trade and balance events from Kafka into Cassandra/ScyllaDB. "
        "Every option is an environment variable (or a key of the --config TOML file, "
        "lower-case without the SETTLER_ prefix); environment wins.",
        epilog="settings (environment variable, description, default):\n" + help_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from settler.worker import run_worker

    return run_worker(settings)
