"""The older mixed sample stream (`generate`) the tests, benchmarks and crash simulation
use: funding deposits, then random trades (each after the freezes of its orders), freezes
and transfers, with Zipf-skewed users and no funding discipline, plus chosen faults.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from settler.core.registry import Registry
from settler.ops.sample import faults
from settler.ops.sample.records import Ids, SampleRecord

TRADE_SHARE = 0.6


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
class _Generator:
    registry: Registry
    shape: StreamShape
    rng: random.Random = field(init=False)
    ids: Ids = field(init=False)
    clock: int = 1_700_000_000_000
    valid: list[SampleRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.shape.seed)
        self.ids = Ids(self.shape.first_trade_id, self.shape.first_event_id)
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
            emit(faults.malformed(gen))
        elif roll < malformed + duplicate and gen.valid:
            original = gen.rng.choice(gen.valid)
            emit(SampleRecord(original.key, original.value, None, duplicate=True))
        elif gen.rng.random() < TRADE_SHARE:
            for record in gen.trade():
                emit(record)
        else:
            emit(gen.other())
    return out
