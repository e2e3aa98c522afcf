"""`settler schema apply`."""

from __future__ import annotations

import argparse
from typing import Any

from settler.config import Settings
from settler.store.schema import apply_schema


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("schema", help="manage the CQL schema")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    apply = actions.add_parser("apply", help="create the keyspace and tables (idempotent)")
    apply.set_defaults(handler=_apply)


def _apply(args: argparse.Namespace, settings: Settings) -> int:
    statements = apply_schema(settings)
    print(f"schema applied to keyspace {settings.keyspace}: {len(statements)} statements")
    return 0
