"""`settler dev up [--secure] | status | down`: the local Kafka + Cassandra stack (no Docker
needed), plain or with its secure listeners (TLS, SASL, passwords)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from settler.config import Settings
from settler.dev import stack as devstack


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dev", help="run real Kafka and Cassandra locally from Maven Central jars"
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="resolve jars once, start both, wait, apply the schema")
    up.add_argument(
        "--secure", action="store_true",
        help="also a Kafka SASL_SSL listener (SCRAM-SHA-512/256, PLAIN) on the Kafka port + 2, "
             "a mutual-TLS listener on + 3, and a second Cassandra with TLS and password "
             "authentication on the CQL port + 100; a throw-away CA, certificates and "
             "passwords are made under .stack/secure/ (settler settings: "
             ".stack/secure/settler.toml)",
    )
    up.set_defaults(handler=_up)
    actions.add_parser("status", help="what runs, in which mode, on which ports, where the "
                       "logs and the CA file are").set_defaults(handler=_status)
    actions.add_parser("down", help="stop everything it started").set_defaults(handler=_down)


def _up(args: argparse.Namespace, settings: Settings) -> int:
    try:
        devstack.up(settings, secure=args.secure)
    except devstack.DevStackError as exc:
        print(f"settler dev up: {exc}", file=sys.stderr)
        return 1
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    services = devstack.status(settings)
    devstack.print_status(services)
    print(devstack.mode_line(settings))
    return 0 if all(service.running for service in services) else 3


def _down(args: argparse.Namespace, settings: Settings) -> int:
    devstack.down(settings)
    return 0
