"""The invalid records both sample streams put in on purpose: one per dead-letter reason,
each a valid-looking trade or deposit broken in exactly one way, and conflicting
duplicates (an earlier valid event's id with different content).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any, Protocol

from settler.core.registry import Symbol
from settler.ops.sample.records import Ids, SampleRecord


class FaultSource(Protocol):
    """What the invalid records need from a generator (both streams' generators have it)."""

    rng: random.Random
    ids: Ids
    symbols: list[Symbol]
    valid: list[SampleRecord]

    def user(self) -> int: ...

    def tick(self) -> int: ...


def malformed(gen: FaultSource) -> SampleRecord:
    """One invalid record, of a reason drawn at random."""
    reason = gen.rng.choice(MALFORMED_REASONS)
    symbol = gen.symbols[0]
    trade: dict[str, Any] = {
        "type": "trade", "trade_id": gen.ids.next_trade(), "symbol": symbol.name,
        "buy_order_id": 1, "sell_order_id": 2, "buyer_user_id": gen.user(),
        "seller_user_id": gen.user(), "base_asset_id": symbol.base.id,
        "quote_asset_id": symbol.quote.id, "price": 150_00, "quantity": 10**8,
        "match_seq": 1, "executed_at": gen.tick(),
    }
    key = symbol.name.encode()
    if reason == "undecodable":
        return SampleRecord(key, b'{"type": "trade", "trade_id": 1', reason)
    if reason == "unknown_asset":
        body = {"type": "deposit", "event_id": gen.ids.next_event(), "user_id": gen.user(),
                "asset_id": 999, "amount": 5, "ts": gen.tick()}
        return SampleRecord(b"1", json.dumps(body).encode(), reason)
    if reason == "conflicting_duplicate":
        return conflicting(gen)
    trade.update(_BREAK_TRADE[reason](symbol.base.id, symbol.quote.id))
    trade = {name: value for name, value in trade.items() if value is not None}
    return SampleRecord(key, json.dumps(trade).encode(), reason)


def conflicting(gen: FaultSource) -> SampleRecord:
    """An earlier valid event's id with different content."""
    original = json.loads(gen.rng.choice(gen.valid).value)
    original["amount" if "amount" in original else "quantity"] += 100_000
    key = original["symbol"] if original["type"] == "trade" else str(original["user_id"])
    return SampleRecord(key.encode(), json.dumps(original).encode(), "conflicting_duplicate")


# How to break a valid BTC_USDT-like trade for each reason (None drops the field).
_BREAK_TRADE: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "unknown_type": lambda base, quote: {"type": "airdrop"},
    "missing_field": lambda base, quote: {"price": None},
    "bad_range": lambda base, quote: {"quantity": -5},
    "wrong_type": lambda base, quote: {"price": 150.5},
    "unknown_symbol": lambda base, quote: {"symbol": "DOGE_USDT"},
    "asset_mismatch": lambda base, quote: {"base_asset_id": quote},
    "inexact_cost": lambda base, quote: {"quantity": 10**8 + 1, "price": 150_01},
    "overflow": lambda base, quote: {"price": 2**62, "quantity": 4},
    "fee_too_large": lambda base, quote: {"buyer_fee": 2 * 10**8},
}

MALFORMED_REASONS = (
    "undecodable", "unknown_type", "missing_field", "bad_range", "wrong_type",
    "unknown_symbol", "asset_mismatch", "inexact_cost", "overflow", "fee_too_large",
    "unknown_asset", "conflicting_duplicate",
)
