"""`settler keys create USER_ID`, `settler keys list [--user USER_ID]` and `settler keys revoke
KEY_ID`: API keys of `settler api`."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from cassandra import InvalidRequest
from cassandra.cluster import Session

from settler import texttable
from settler.commands.balances import user_id_argument
from settler.config import Settings
from settler.read import apikeys
from settler.store import cql

A = TypeVar("A")
T = TypeVar("T")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("keys", help="create, list and revoke API keys of `settler api`")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create", help="print a new key for USER_ID (shown once; only its hash is stored)"
    )
    create.add_argument("user_id", type=user_id_argument, metavar="USER_ID")
    create.set_defaults(handler=_create)
    listing = actions.add_parser(
        "list", help="a table of key ids, owners, creation times and states (never the keys)"
    )
    listing.add_argument("--user", type=user_id_argument, metavar="USER_ID",
                         help="only the keys of this user")
    listing.set_defaults(handler=_list)
    revoke = actions.add_parser("revoke", help="revoke a key by its KEY_ID")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(handler=_revoke)


def _create(args: argparse.Namespace, settings: Settings) -> int:
    new = _call("create", settings, apikeys.create_key, args.user_id)
    if new is None:
        return 1
    print(f"key_id: {new.key_id}")
    print(f"api_key: {new.key}")
    print(f"user_id: {new.user_id}")
    print("Store the API key now: it is not shown again.", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    keys = _call("list", settings, apikeys.list_keys, args.user)
    if keys is None:
        return 1
    rows = [("KEY_ID", "USER_ID", "CREATED (UTC)", "STATE")] + [
        (key.key_id, str(key.user_id),
         time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(key.created_at_ms / 1000)),
         "revoked" if key.revoked else "active")
        for key in keys
    ]
    print(texttable.render(rows, left=len(rows[0])))
    return 0


def _revoke(args: argparse.Namespace, settings: Settings) -> int:
    revoked = _call("revoke", settings, apikeys.revoke_key, args.key_id)
    if revoked is None:
        return 1
    if not revoked:
        print(f"settler keys revoke: no key with id {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0


def _call(action_name: str, settings: Settings,
          action: Callable[[Session, A], Awaitable[T]], argument: A) -> T | None:
    """Run `action` in the settlement keyspace; None (after one line on stderr) when the
    database cannot be reached or rejects it."""
    try:
        return asyncio.run(_in_keyspace(settings, action, argument))
    except (*cql.TRANSIENT_ERRORS, InvalidRequest) as exc:
        print(f"settler keys {action_name}: {exc}", file=sys.stderr)
        return None


async def _in_keyspace(settings: Settings, action: Callable[[Session, A], Awaitable[T]],
                       argument: A) -> T:
    cluster, session = await asyncio.to_thread(cql.connect, settings, keyspace=settings.keyspace)
    try:
        return await action(session, argument)
    finally:
        await asyncio.to_thread(cluster.shutdown)
