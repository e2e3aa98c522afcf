"""Realistic sample streams: deposits, order freezes, trades with refunds and fees,
cancels, withdrawals; optionally with re-sent duplicates and malformed records.

Used by `settler sample` (the README's run command), the tests and the benchmarks.
Every record says what a correct settler must do with it (`expect`), so a test can
check dead-letter reasons one by one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from settler.registry import Registry

TRADE_SHARE = 0.6


@dataclass(frozen=True, slots=True)
class SampleRecord:
    key: bytes
    value: bytes
    expect: str | None = None  # a dead-letter reason, or None for a valid event
    duplicate: bool = False  # a re-send of an earlier valid record


@dataclass
class StreamShape:
    events: int = 1000
    users: int = 200
    zipf: float = 0.0  # > 0: users drawn from a Zipf law (a few market makers)
    duplicate_rate: float = 0.0
    malformed_rate: float = 0.0
    seed: int = 1
    first_trade_id: int = 1_000_000
    first_event_id: int = 1
    user_offset: int = 10_000


@dataclass
class _Ids:
    trade: int
    event: int

    def next_trade(self) -> int:
        self.trade += 1
        return self.trade

    def next_event(self) -> int:
        self.event += 1
        return self.event


@dataclass
class _Generator:
    registry: Registry
    shape: StreamShape
    rng: random.Random = field(init=False)
    ids: _Ids = field(init=False)
    clock: int = 1_700_000_000_000
    valid: list[SampleRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.shape.seed)
        self.ids = _Ids(self.shape.first_trade_id, self.shape.first_event_id)
        weights = [
            1.0 / (rank ** self.shape.zipf) if self.shape.zipf > 0 else 1.0
            for rank in range(1, self.shape.users + 1)
        ]
        self.user_ids = [self.shape.user_offset + n for n in range(1, self.shape.users + 1)]
        self.weights = weights
        self.symbols = sorted(self.registry.symbols.values(), key=lambda s: s.name)

    def user(self) -> int:
        return self.rng.choices(self.user_ids, self.weights)[0]

    def tick(self) -> int:
        self.clock += self.rng.randint(1, 50)
        return self.clock

    def balance(self, kind: str, user: int, asset: int, amount: int) -> SampleRecord:
        body = {"type": kind, "event_id": self.ids.next_event(), "user_id": user,
                "asset_id": asset, "amount": amount, "ts": self.tick()}
        return SampleRecord(str(user).encode(), json.dumps(body).encode())

    def funding(self) -> Iterator[SampleRecord]:
        for user in self.user_ids:
            for asset in sorted(self.registry.assets_by_id):
                yield self.balance("deposit", user, asset, self.rng.randint(10, 1000) * 10**8)

    def trade(self) -> Iterator[SampleRecord]:
        symbol = self.rng.choice(self.symbols)
        buyer, seller = self.user(), self.user()
        price = self.rng.randint(100_00, 5000_00)  # cents of quote per whole base
        quantity = self.rng.randint(1, 2000) * 10**5  # multiples keep the cost exact
        scale = 10 ** (symbol.price_decimals + symbol.base.decimals - symbol.quote.decimals)
        cost = price * quantity // scale
        buyer_refund = self.rng.choice([0, 0, cost // 100])
        seller_refund = self.rng.choice([0, 0, quantity // 50])
        yield self.balance("freeze", buyer, symbol.quote.id, cost + buyer_refund)
        yield self.balance("freeze", seller, symbol.base.id, quantity + seller_refund)
        body: dict[str, Any] = {
            "type": "trade", "trade_id": self.ids.next_trade(), "symbol": symbol.name,
            "buy_order_id": self.rng.randint(1, 2**40), "sell_order_id": self.rng.randint(1, 2**40),
            "buyer_user_id": buyer, "seller_user_id": seller,
            "base_asset_id": symbol.base.id, "quote_asset_id": symbol.quote.id,
            "price": price, "quantity": quantity, "buyer_refund": buyer_refund,
            "seller_refund": seller_refund, "buyer_fee": quantity // 1000,
            "seller_fee": cost // 1000, "match_seq": self.ids.trade, "executed_at": self.tick(),
        }
        if self.rng.random() < 0.5:
            body["quote_amount"] = cost
        yield SampleRecord(symbol.name.encode(), json.dumps(body).encode())

    def other(self) -> SampleRecord:
        kind = self.rng.choice(["deposit", "withdraw", "freeze", "unfreeze"])
        asset = self.rng.choice(sorted(self.registry.assets_by_id))
        return self.balance(kind, self.user(), asset, self.rng.randint(1, 100) * 10**6)

    def malformed(self) -> SampleRecord:
        """One invalid record, of a reason drawn at random."""
        reason = self.rng.choice(_MALFORMED)
        symbol = self.symbols[0]
        trade: dict[str, Any] = {
            "type": "trade", "trade_id": self.ids.next_trade(), "symbol": symbol.name,
            "buy_order_id": 1, "sell_order_id": 2, "buyer_user_id": self.user(),
            "seller_user_id": self.user(), "base_asset_id": symbol.base.id,
            "quote_asset_id": symbol.quote.id, "price": 150_00, "quantity": 10**8,
            "match_seq": 1, "executed_at": self.tick(),
        }
        key = symbol.name.encode()
        if reason == "undecodable":
            return SampleRecord(key, b'{"type": "trade", "trade_id": 1', reason)
        if reason == "unknown_asset":
            body = {"type": "deposit", "event_id": self.ids.next_event(), "user_id": self.user(),
                    "asset_id": 999, "amount": 5, "ts": self.tick()}
            return SampleRecord(b"1", json.dumps(body).encode(), reason)
        if reason == "conflicting_duplicate":
            return self.conflicting()
        trade.update(_BREAK_TRADE[reason](symbol.base.id, symbol.quote.id))
        trade = {name: value for name, value in trade.items() if value is not None}
        return SampleRecord(key, json.dumps(trade).encode(), reason)


    def conflicting(self) -> SampleRecord:
        """An earlier valid event's id with different content."""
        original = json.loads(self.rng.choice(self.valid).value)
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

_MALFORMED = (
    "undecodable", "unknown_type", "missing_field", "bad_range", "wrong_type",
    "unknown_symbol", "asset_mismatch", "inexact_cost", "overflow", "fee_too_large",
    "unknown_asset", "conflicting_duplicate",
)


def generate(registry: Registry, shape: StreamShape) -> list[SampleRecord]:
    """A stream of about `shape.events` records: funding deposits first, then a random mix
    of trades (each preceded by the freezes of its orders) and other balance events."""
    gen = _Generator(registry, shape)
    out: list[SampleRecord] = []

    def emit(record: SampleRecord) -> None:
        out.append(record)
        if record.expect is None and not record.duplicate:
            gen.valid.append(record)

    for record in gen.funding():
        emit(record)
    # Rates are per record; a trade roll emits three records (two freezes and the trade).
    per_roll = TRADE_SHARE * 3 + (1 - TRADE_SHARE)
    malformed, duplicate = shape.malformed_rate * per_roll, shape.duplicate_rate * per_roll
    while len(out) < shape.events:
        roll = gen.rng.random()
        if roll < malformed and gen.valid:
            emit(gen.malformed())
        elif roll < malformed + duplicate and gen.valid:
            original = gen.rng.choice(gen.valid)
            emit(SampleRecord(original.key, original.value, None, duplicate=True))
        elif gen.rng.random() < TRADE_SHARE:
            for record in gen.trade():
                emit(record)
        else:
            emit(gen.other())
    return out
