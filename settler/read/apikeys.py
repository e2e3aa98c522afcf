"""API keys of the balances HTTP API: create, list, revoke, and find the user owning a key.

Keys are shown once at creation and stored only as their SHA-256 (schema/005_api_keys.cql).
Every function takes a driver Session bound to the settlement keyspace; the CQL text of keys
lives here and nowhere else.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
import weakref
from dataclasses import dataclass
from typing import Final

from cassandra.cluster import Session
from cassandra.query import BatchStatement, BatchType, PreparedStatement

from settler.store import cql

KEY_PREFIX: Final = "sk_"
KEY_ID_PREFIX: Final = "kid_"
MAX_KEY_LENGTH: Final = 128
"""Longer header values cannot be one of our keys; they are rejected without a query."""

_CQL: Final = {
    "insert_key": (
        "INSERT INTO {ks}.api_keys (key_hash, key_id, user_id, created_at, revoked)"
        " VALUES (?, ?, ?, ?, false)"
    ),
    "insert_key_id": "INSERT INTO {ks}.api_keys_by_id (key_id, key_hash) VALUES (?, ?)",
    "owner": "SELECT user_id, key_id, revoked FROM {ks}.api_keys WHERE key_hash = ?",
    "hash_of_id": "SELECT key_hash FROM {ks}.api_keys_by_id WHERE key_id = ?",
    "revoke": "UPDATE {ks}.api_keys SET revoked = true WHERE key_hash = ?",
    # A whole-table read: for an operator's listing, never on a request path.
    "all": "SELECT key_id, user_id, created_at, revoked FROM {ks}.api_keys",
}

# Prepared once per session; the driver does not deduplicate `prepare()` round trips itself.
_prepared: weakref.WeakKeyDictionary[Session, dict[str, PreparedStatement]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly created key: `key` is shown to its owner once and never stored."""

    key_id: str
    key: str
    user_id: int


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What an operator may see of a key: never the key, nor its hash."""

    key_id: str
    user_id: int
    created_at_ms: int
    revoked: bool


@dataclass(frozen=True, slots=True)
class KeyOwner:
    key_id: str
    user_id: int


def key_hash(key: str) -> bytes:
    """SHA-256 of the key. A fast hash is the right tool here (unlike for passwords): keys
    carry 256 random bits, so there is nothing for a slow hash to protect against."""
    return hashlib.sha256(key.encode("utf-8")).digest()


async def prepare(session: Session) -> dict[str, PreparedStatement]:
    """Prepare every key statement on this session (idempotent; call at start-up)."""
    statements = _prepared.get(session)
    if statements is None:
        statements = await asyncio.to_thread(
            lambda: {name: session.prepare(text.format(ks=session.keyspace))
                     for name, text in _CQL.items()}
        )
        _prepared[session] = statements
    return statements


async def create_key(session: Session, user_id: int) -> NewKey:
    """A new random key for `user_id`; both tables are written in one LOGGED batch so a key
    is never findable by hash without being revocable by id."""
    statements = await prepare(session)
    new = NewKey(
        key_id=KEY_ID_PREFIX + secrets.token_hex(8),
        key=KEY_PREFIX + secrets.token_urlsafe(32),
        user_id=user_id,
    )
    digest = key_hash(new.key)
    batch = BatchStatement(BatchType.LOGGED)
    batch.add(statements["insert_key"], (digest, new.key_id, user_id, int(time.time() * 1000)))
    batch.add(statements["insert_key_id"], (new.key_id, digest))
    await cql.run(session, batch)
    return new


async def list_keys(session: Session, user_id: int | None = None) -> list[KeyInfo]:
    """Every key (or every key of `user_id`), oldest first."""
    statements = await prepare(session)
    keys = [
        KeyInfo(key_id, owner, created_at or 0, bool(revoked))
        for key_id, owner, created_at, revoked in await cql.run(session, statements["all"])
        if user_id is None or owner == user_id
    ]
    return sorted(keys, key=lambda key: (key.created_at_ms, key.key_id))


async def revoke_key(session: Session, key_id: str) -> bool:
    """Mark a key revoked (idempotent); False when no key has this id."""
    statements = await prepare(session)
    rows = await cql.run(session, statements["hash_of_id"], (key_id,))
    first = next(iter(rows), None)
    if first is None:
        return False
    await cql.run(session, statements["revoke"], (first[0],))
    return True


async def key_owner(session: Session, key: str) -> KeyOwner | None:
    """The owner of a live key, or None for an unknown or revoked one.

    Not cached: one single-partition read per request, so a revocation takes effect on
    the very next request.
    """
    if not key.startswith(KEY_PREFIX) or len(key) > MAX_KEY_LENGTH:
        return None
    statements = await prepare(session)
    rows = await cql.run(session, statements["owner"], (key_hash(key),))
    first = next(iter(rows), None)
    if first is None:
        return None
    user_id, key_id, revoked = first
    return None if revoked else KeyOwner(key_id=key_id, user_id=user_id)
