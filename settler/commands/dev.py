"""`settler dev up | status | down`: the local Kafka + Cassandra stack (no Docker needed)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from settler import devstack
from settler.config import Settings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dev", help="run real Kafka and Cassandra locally from Maven Central jars"
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("up", help="resolve jars once, start both, wait, apply the schema"
                       ).set_defaults(handler=_up)
    actions.add_parser("status", help="what runs, on which ports, where the logs are"
                       ).set_defaults(handler=_status)
    actions.add_parser("down", help="stop both").set_defaults(handler=_down)


def _up(args: argparse.Namespace, settings: Settings) -> int:
    try:
        devstack.up(settings)
    except devstack.DevStackError as exc:
        print(f"settler dev up: {exc}", file=sys.stderr)
        return 1
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    services = devstack.status(settings)
    devstack.print_status(services)
    return 0 if all(service.running for service in services) else 3


def _down(args: argparse.Namespace, settings: Settings) -> int:
    devstack.down(settings)
    return 0
