"""The input streams of the benchmarks, built in memory before anything is timed.

`trade_stream`: exactly N trades between users drawn from a Zipf law (a few market makers on
most trades), each side funded first by a deposit and a freeze of exactly what its trades
take, so no row ever ends below zero. `deposit_stream`: one deposit per user, for memory.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from settler.core.registry import Registry, Symbol
from settler.ops.sample import SampleRecord

FIRST_USER = 100_001
FIRST_TRADE_ID = 1_000_000
FIRST_EVENT_ID = 1
START_MS = 1_700_000_000_000
USERS_PER_TRADE = 1 / 40  # keeps the funding share of a stream (about 10%) the same at any size


@dataclass(frozen=True)
class TradeShape:
    trades: int
    users: int
    zipf: float = 1.1
    seed: int = 7

    @classmethod
    def scaled(cls, trades: int, zipf: float = 1.1, seed: int = 7) -> TradeShape:
        """`trades` trades among a number of users proportional to it."""
        return cls(trades, max(20, round(trades * USERS_PER_TRADE)), zipf, seed)


@dataclass(frozen=True)
class Stream:
    """Records in produce order, and what they contain."""

    records: list[SampleRecord]
    trades: int
    users: int  # distinct users with at least one event (the fee account not counted)
    description: str
    top10_share: float = 0.0  # share of trade sides taken by the 10 most active users

    @property
    def events(self) -> int:
        return len(self.records)

    @property
    def funding(self) -> int:
        """Records before the first trade (all of them in a stream without trades)."""
        return self.events - self.trades

    @property
    def funding_records(self) -> list[SampleRecord]:
        return self.records[:self.funding]

    @property
    def trade_records(self) -> list[SampleRecord]:
        return self.records[self.funding:]


def _zipf_cumulative(n: int, exponent: float) -> list[float]:
    return list(itertools.accumulate(1.0 / rank**exponent for rank in range(1, n + 1)))


def trade_stream(registry: Registry, shape: TradeShape) -> Stream:
    """Deposits and freezes funding every (user, asset) that trades take from, then trades."""
    rng = random.Random(shape.seed)
    symbols = sorted(registry.symbols.values(), key=lambda s: s.name)
    users = list(range(FIRST_USER, FIRST_USER + shape.users))
    cumulative = _zipf_cumulative(shape.users, shape.zipf)
    draws = rng.choices(users, cum_weights=cumulative, k=2 * shape.trades)
    clock = START_MS
    need: dict[tuple[int, int], int] = defaultdict(int)
    trades: list[SampleRecord] = []
    sides: dict[int, int] = defaultdict(int)
    for n in range(shape.trades):
        buyer, seller = draws[2 * n], draws[2 * n + 1]
        while seller == buyer:  # matching engines prevent self-trades by default
            seller = rng.choices(users, cum_weights=cumulative)[0]
        sides[buyer] += 1
        sides[seller] += 1
        clock += rng.randint(1, 5)
        body = _trade(rng, rng.choice(symbols), FIRST_TRADE_ID + n, buyer, seller, clock)
        symbol = registry.symbols[body["symbol"]]
        need[(buyer, symbol.quote.id)] += body["quote_amount"] + body["buyer_refund"]
        need[(seller, symbol.base.id)] += body["quantity"] + body["seller_refund"]
        trades.append(SampleRecord(symbol.name.encode(), json.dumps(body).encode()))
    funding: list[SampleRecord] = []
    event_id = FIRST_EVENT_ID
    for (user, asset), amount in sorted(need.items()):
        for kind in ("deposit", "freeze"):
            body = {"type": kind, "event_id": event_id, "user_id": user, "asset_id": asset,
                    "amount": amount, "ts": START_MS - 1}
            funding.append(SampleRecord(str(user).encode(), json.dumps(body).encode()))
            event_id += 1
    top10 = sum(sorted(sides.values(), reverse=True)[:10]) / max(1, 2 * shape.trades)
    description = (
        f"{shape.trades:,} trades over {len(symbols)} symbols "
        f"({', '.join(s.name for s in symbols)}) between {len(sides):,} users drawn from a "
        f"Zipf law (s={shape.zipf}; the 10 most active users take {top10:.0%} of trade sides; "
        f"the fee account is on every trade), after {len(funding):,} funding events "
        f"(a deposit and a freeze of exactly what each user's orders need)"
    )
    return Stream(funding + trades, shape.trades, len(sides), description, top10)


def _trade(rng: random.Random, symbol: Symbol, trade_id: int, buyer: int, seller: int,
           executed_at: int) -> dict[str, Any]:
    """A trade shaped like settler.ops.sample's: price improvement refunds and fees included."""
    price = rng.randint(100_00, 5000_00)
    quantity = rng.randint(1, 2000) * 10**5  # multiples of 10^5 keep the cost exact
    scale = 10 ** (symbol.price_decimals + symbol.base.decimals - symbol.quote.decimals)
    cost = price * quantity // scale
    return {
        "type": "trade", "trade_id": trade_id, "symbol": symbol.name,
        "buy_order_id": rng.randint(1, 2**40), "sell_order_id": rng.randint(1, 2**40),
        "buyer_user_id": buyer, "seller_user_id": seller,
        "base_asset_id": symbol.base.id, "quote_asset_id": symbol.quote.id,
        "price": price, "quantity": quantity, "quote_amount": cost,
        "buyer_refund": rng.choice([0, 0, cost // 100]),
        "seller_refund": rng.choice([0, 0, quantity // 50]),
        "buyer_fee": quantity // 1000, "seller_fee": cost // 1000,
        "match_seq": trade_id, "executed_at": executed_at,
    }


def deposit_stream(registry: Registry, users: int) -> Stream:
    """One deposit per user: every record brings a user the worker has not seen."""
    assets = sorted(registry.assets_by_id)
    records = [
        SampleRecord(str(user).encode(), json.dumps({
            "type": "deposit", "event_id": FIRST_EVENT_ID + n, "user_id": user,
            "asset_id": assets[n % len(assets)], "amount": 10**8, "ts": START_MS + n,
        }).encode())
        for n, user in enumerate(range(FIRST_USER, FIRST_USER + users))
    ]
    return Stream(records, 0, users, f"{users:,} deposits, one per user")
