"""`settler balances USER_ID [--asset NAME] [--json]`: a user's balances for people or tools."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from cassandra import InvalidRequest

from settler.config import Settings
from settler.core.registry import Asset, Registry, load_registry
from settler.read.balances_view import (
    BalanceView,
    balances_document,
    balances_table,
    parse_user_id,
    view_one,
    view_rows,
)
from settler.store import cql
from settler.store.db import SettlementDb


def user_id_argument(text: str) -> int:
    """argparse type: a bad id becomes argparse's one-line error and exit code 2."""
    try:
        return parse_user_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "balances", help="show a user's balances (decimal strings in whole units)"
    )
    parser.add_argument("user_id", type=user_id_argument, metavar="USER_ID")
    parser.add_argument("--asset", metavar="NAME", help="only this asset (registry name)")
    parser.add_argument("--json", action="store_true", help="one JSON document for tools")
    parser.set_defaults(handler=_show)


def _show(args: argparse.Namespace, settings: Settings) -> int:
    registry = load_registry(settings.registry)
    asset: Asset | None = None
    if args.asset is not None:
        asset = registry.asset_named(args.asset)
        if asset is None:
            known = ", ".join(sorted(registry.assets_by_name))
            print(f"settler balances: unknown asset {args.asset!r} (registry has {known})",
                  file=sys.stderr)
            return 2
    try:
        views = asyncio.run(_read(settings, args.user_id, asset, registry))
    except (*cql.TRANSIENT_ERRORS, InvalidRequest) as exc:
        print(f"settler balances: cannot read keyspace {settings.keyspace}: {exc}",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(balances_document(args.user_id, views)))
    else:
        print(balances_table(views))
    return 0


async def _read(settings: Settings, user_id: int, asset: Asset | None,
                registry: Registry) -> list[BalanceView]:
    db = await SettlementDb.open(settings)
    try:
        if asset is None:
            return view_rows(await db.get_user_all_balances(user_id), registry)
        return [view_one(await db.get_user_balance(user_id, asset.id), asset)]
    finally:
        await db.close()
