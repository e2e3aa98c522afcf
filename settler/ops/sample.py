"""Sample streams for `settler sample` (the README's `make run`), the tests and the benchmarks.

`market()` is what `settler sample` publishes: users funded by deposits before they
trade; limit orders that freeze what they may spend (never more than is available);
trades between a taker and a market maker's resting order that spend exactly what the
orders froze (the taker's price improvement and unfilled rest come back with the trade,
fees go to the fee account); cancels that unfreeze what is left; withdrawals within
what is available. Optionally re-sent duplicates and malformed records.

Its promise, which is what lets a worker settle it with no balance anomaly however
Kafka interleaves the partitions: every record that touches a user's balance rows lands
on that user's *home partition*, in the order the user did things. Balance events are
keyed by the user id and trades by the symbol (SPEC §1); a user trades only the symbols
whose key Kafka's default partitioner sends to the same partition as the user's own id
(users homed where no symbol lands deposit, withdraw and cancel orders, but never
trade). The fee account is only ever credited. So within each partition every debit of
a row comes after the credits that cover it, and any interleaving of the partitions
that keeps each one's order leaves every row >= 0 after every event. (A real engine
whose users trade across partitions gives no such promise: SPEC §3 anomalies.)

`generate()` is the older mixed stream the tests, benchmarks and crash simulation use:
random trades, freezes and transfers with Zipf-skewed users and no funding discipline.
Every record of either says what a correct settler must do with it (`expect`), so a
test can check dead-letter reasons one by one.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

from aiokafka.partitioner import murmur2

from settler.core.amounts import cost
from settler.core.registry import Registry, Symbol

TRADE_SHARE = 0.6


@dataclass(frozen=True, slots=True)
class SampleRecord:
    key: bytes
    value: bytes
    expect: str | None = None  # a dead-letter reason, or None for a valid event
    duplicate: bool = False  # a re-send of an earlier valid record
    partition: int | None = None  # where it must be published (None: by its key)


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
        return _malformed(self)

    def conflicting(self) -> SampleRecord:
        """An earlier valid event's id with different content."""
        return _conflicting(self)


class _FaultSource(Protocol):
    """What the invalid records need from a generator (both generators below have it)."""

    rng: random.Random
    ids: _Ids
    symbols: list[Symbol]
    valid: list[SampleRecord]

    def user(self) -> int: ...

    def tick(self) -> int: ...


def _malformed(gen: _FaultSource) -> SampleRecord:
    reason = gen.rng.choice(_MALFORMED)
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
        return _conflicting(gen)
    trade.update(_BREAK_TRADE[reason](symbol.base.id, symbol.quote.id))
    trade = {name: value for name, value in trade.items() if value is not None}
    return SampleRecord(key, json.dumps(trade).encode(), reason)


def _conflicting(gen: _FaultSource) -> SampleRecord:
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


# -- the market stream of `settler sample` ----------------------------------------------------


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (Java client and aiokafka alike: murmur2 of
    the key, made positive, modulo the count) sends a keyed record to."""
    hashed: int = murmur2(key)
    return (hashed & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class MarketShape:
    events: int = 5000  # valid events (deposits, withdrawals, freezes, unfreezes, trades)
    users: int = 200
    partitions: int = 3  # of the topic the stream is published to
    market_makers: int = 2  # per partition that carries trades
    duplicate_rate: float = 0.0  # share of records that re-send an earlier valid one
    malformed_rate: float = 0.0  # share of records that are invalid (dead-lettered)
    seed: int = 1
    first_trade_id: int = 1_000_000
    first_event_id: int = 1
    first_order_id: int = 1
    user_offset: int = 10_000


@dataclass
class Order:
    """A resting limit order and what is still frozen for it: quote for a buy, base for a
    sell. Every fill spends exactly its share; a cancel unfreezes the rest."""

    order_id: int
    user: int
    symbol: Symbol
    side: str  # "buy" or "sell"
    price: int
    remaining: int  # base raw units not yet filled
    frozen: int

    @property
    def asset(self) -> int:
        return self.symbol.quote.id if self.side == "buy" else self.symbol.base.id


@dataclass(frozen=True)
class Sample:
    """A market stream and the generator's own account of it."""

    records: list[SampleRecord]
    partitions: int
    home: dict[int, int]  # every sample user -> the partition of all its records
    market_makers: tuple[int, ...]
    open_orders: tuple[Order, ...]  # resting at the end: their funds stay frozen
    balances: dict[tuple[int, int], tuple[int, int]]  # (user, asset) -> (available, frozen)
    kinds: Counter[str]  # valid records by type
    duplicates: int
    malformed: Counter[str]  # invalid records by the reason they must be dead-lettered with


# Whole quote units per whole base unit where a market starts; other symbols start at 100.
_START_PRICES: Final = {"BTC_USDT": 60_000, "ETH_USDT": 3_000}
TAKER_FEE_BPS: Final = 10
MAKER_FEE_BPS: Final = 2
QUOTES_PER_SIDE: Final = 4  # a market maker's resting orders per side before it re-quotes


@dataclass
class _Book:
    symbol: Symbol
    mid: int  # raw price
    step: int  # raw price of one basis point of the start price (at least one tick)
    lot: int  # base raw units of one lot; any price times a lot has an exact cost
    makers: list[int]
    takers: list[int]
    buys: list[Order] = field(default_factory=list)
    sells: list[Order] = field(default_factory=list)
    seq: int = 0

    def cost(self, price: int, quantity: int) -> int:
        return cost(price, quantity, base_decimals=self.symbol.base.decimals,
                    quote_decimals=self.symbol.quote.decimals,
                    price_decimals=self.symbol.price_decimals)

    def best(self, side: str, not_of: int | None = None) -> Order | None:
        """The best resting order of `side` that `not_of` does not own (no self-trades)."""
        orders = [o for o in (self.buys if side == "buy" else self.sells) if o.user != not_of]
        if not orders:
            return None
        if side == "buy":
            return max(orders, key=lambda o: (o.price, -o.order_id))
        return min(orders, key=lambda o: (o.price, o.order_id))


@dataclass
class _Market:
    """Users, their balances, one order book per symbol; every step emits the records a
    matching engine and a wallet would publish for one thing a user does."""

    registry: Registry
    shape: MarketShape
    rng: random.Random = field(init=False)
    ids: _Ids = field(init=False)
    clock: int = 1_700_000_000_000
    valid: list[SampleRecord] = field(default_factory=list)
    records: list[SampleRecord] = field(default_factory=list)
    rows: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    parked: list[Order] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    malformed_reasons: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0

    def __post_init__(self) -> None:
        shape = self.shape
        self.rng = random.Random(shape.seed)
        self.ids = _Ids(shape.first_trade_id, shape.first_event_id)
        self.next_order = shape.first_order_id
        self.symbols = sorted(self.registry.symbols.values(), key=lambda s: s.name)
        self.users = [shape.user_offset + n for n in range(1, shape.users + 1)]
        if self.registry.fee_account in self.users:
            raise ValueError("the sample's user ids include the fee account")
        self.home = {u: partition_of(str(u).encode(), shape.partitions) for u in self.users}
        self.books: list[_Book] = []
        makers: list[int] = []
        for partition in range(shape.partitions):
            symbols = [s for s in self.symbols
                       if partition_of(s.name.encode(), shape.partitions) == partition]
            local = [u for u in self.users if self.home[u] == partition]
            if not symbols or len(local) < 2:
                continue  # nobody here trades: wallet activity and cancelled orders only
            count = max(1, min(shape.market_makers, len(local) - 1))
            makers += local[:count]
            for symbol in symbols:
                self.books.append(_new_book(symbol, local[:count], local[count:]))
        self.makers = tuple(makers)
        self.by_user = {u: [b for b in self.books if u in b.makers or u in b.takers]
                        for u in self.users}

    # -- what the faults helpers need --------------------------------------------------------

    def user(self) -> int:
        return self.rng.choice(self.users)

    def tick(self) -> int:
        self.clock += self.rng.randint(1, 50)
        return self.clock

    # -- records -----------------------------------------------------------------------------

    def emit(self, record: SampleRecord) -> None:
        partition = partition_of(record.key, self.shape.partitions)
        self.records.append(replace(record, partition=partition))
        if record.expect is None and not record.duplicate:
            self.valid.append(self.records[-1])

    def row(self, user: int, asset: int) -> list[int]:
        return self.rows.setdefault((user, asset), [0, 0])

    def available(self, user: int, asset: int) -> int:
        return self.rows.get((user, asset), [0, 0])[0]

    def balance(self, kind: str, user: int, asset: int, amount: int) -> None:
        """Emit one balance event and book it; the generator never lets a row go below 0."""
        row = self.row(user, asset)
        move = {"deposit": (amount, 0), "withdraw": (-amount, 0),
                "freeze": (-amount, amount), "unfreeze": (amount, -amount)}[kind]
        row[0] += move[0]
        row[1] += move[1]
        assert amount > 0 and row[0] >= 0 and row[1] >= 0, (kind, user, asset, amount, row)
        body = {"type": kind, "event_id": self.ids.next_event(), "user_id": user,
                "asset_id": asset, "amount": amount, "ts": self.tick()}
        self.kinds[kind] += 1
        self.emit(SampleRecord(str(user).encode(), json.dumps(body).encode()))

    def trade(self, book: _Book, buy: Order, sell: Order, price: int, quantity: int, *,
              buyer_refund: int, seller_refund: int, taker_side: str) -> None:
        """Emit one fill of `buy` against `sell` and book it: each order's frozen funds go
        down by exactly what the trade takes from them."""
        paid = book.cost(price, quantity)
        buyer_bps, seller_bps = ((TAKER_FEE_BPS, MAKER_FEE_BPS) if taker_side == "buy"
                                 else (MAKER_FEE_BPS, TAKER_FEE_BPS))
        buyer_fee, seller_fee = quantity * buyer_bps // 10_000, paid * seller_bps // 10_000
        base, quote = book.symbol.base.id, book.symbol.quote.id
        for order, spent in ((buy, paid + buyer_refund), (sell, quantity + seller_refund)):
            order.frozen -= spent
            order.remaining -= quantity
            assert order.frozen >= 0 and order.remaining >= 0, order
        moves = (((buy.user, quote), buyer_refund, -(paid + buyer_refund)),
                 ((buy.user, base), quantity - buyer_fee, 0),
                 ((sell.user, base), seller_refund, -(quantity + seller_refund)),
                 ((sell.user, quote), paid - seller_fee, 0),
                 ((self.registry.fee_account, base), buyer_fee, 0),
                 ((self.registry.fee_account, quote), seller_fee, 0))
        for (user, asset), available, frozen in moves:
            if available == 0 and frozen == 0:
                continue  # no fee: settlement does not touch the fee account's row
            row = self.row(user, asset)
            row[0] += available
            row[1] += frozen
            assert row[0] >= 0 and row[1] >= 0, (user, asset, row)
        book.seq += 1
        body = {
            "type": "trade", "trade_id": self.ids.next_trade(), "symbol": book.symbol.name,
            "buy_order_id": buy.order_id, "sell_order_id": sell.order_id,
            "buyer_user_id": buy.user, "seller_user_id": sell.user,
            "base_asset_id": base, "quote_asset_id": quote, "price": price,
            "quantity": quantity, "quote_amount": paid, "buyer_refund": buyer_refund,
            "seller_refund": seller_refund, "buyer_fee": buyer_fee, "seller_fee": seller_fee,
            "match_seq": book.seq, "executed_at": self.tick(),
        }
        self.kinds["trade"] += 1
        self.emit(SampleRecord(book.symbol.name.encode(), json.dumps(body).encode()))

    # -- what users do -------------------------------------------------------------------------

    def order(self, user: int, book: _Book, side: str, price: int, lots: int) -> Order | None:
        """Place (freeze for) an order of up to `lots` lots that the user can pay for."""
        asset = book.symbol.quote.id if side == "buy" else book.symbol.base.id
        per_lot = book.cost(price, book.lot) if side == "buy" else book.lot
        lots = min(lots, self.available(user, asset) // per_lot)
        if lots <= 0:
            return None
        self.next_order += 1
        placed = Order(self.next_order, user, book.symbol, side, price, lots * book.lot,
                       lots * per_lot)
        self.balance("freeze", user, asset, placed.frozen)
        return placed

    def cancel(self, order: Order) -> None:
        for book in self.books:
            for resting in (book.buys, book.sells):
                if order in resting:
                    resting.remove(order)
        if order in self.parked:
            self.parked.remove(order)
        if order.frozen:
            self.balance("unfreeze", order.user, order.asset, order.frozen)
        order.frozen = order.remaining = 0

    def quote(self) -> bool:
        """A market maker adds a resting order near the mid price (re-quoting its oldest
        order on that side first when it has enough of them)."""
        if not self.books:
            return False
        book = self.rng.choice(self.books)
        maker = self.rng.choice(book.makers)
        side = self.rng.choice(["buy", "sell"])
        resting = book.buys if side == "buy" else book.sells
        own = [o for o in resting if o.user == maker]
        if len(own) >= QUOTES_PER_SIDE:
            self.cancel(own[0])
        offset = self.rng.randint(1, 10) * book.step
        if side == "buy":
            best_sell = book.best("sell")
            price = book.mid - offset
            if best_sell is not None:
                price = min(price, best_sell.price - book.step)
        else:
            best_buy = book.best("buy")
            price = book.mid + offset
            if best_buy is not None:
                price = max(price, best_buy.price + book.step)
        placed = self.order(maker, book, side, max(price, book.step), self.rng.randint(5, 40))
        if placed is None:
            return False
        resting.append(placed)
        return True

    def take(self) -> bool:
        """A user sends an immediate-or-cancel order that fills against the best resting
        one: it freezes at its own limit, the trade returns the price improvement and the
        unfilled rest."""
        if not self.books:
            return False
        book = self.rng.choice(self.books)
        taker = self.rng.choice(book.takers or book.makers)
        side = self.rng.choice(["buy", "sell"])
        maker_order = book.best("sell" if side == "buy" else "buy", not_of=taker)
        if maker_order is None:
            return False
        slip = self.rng.randint(0, 3) * book.step
        limit = maker_order.price + slip if side == "buy" else max(book.step,
                                                                   maker_order.price - slip)
        mine = self.order(taker, book, side, limit, self.rng.randint(1, 30))
        if mine is None:
            return False
        quantity = min(mine.remaining, maker_order.remaining)
        price = maker_order.price
        buy, sell = (mine, maker_order) if side == "buy" else (maker_order, mine)
        if side == "buy":
            refunds = {"buyer_refund": mine.frozen - book.cost(price, quantity),
                       "seller_refund": 0}
        else:
            refunds = {"buyer_refund": 0, "seller_refund": mine.frozen - quantity}
        self.trade(book, buy, sell, price, quantity, taker_side=side, **refunds)
        assert mine.frozen == 0
        if maker_order.remaining == 0:
            assert maker_order.frozen == 0
            (book.buys if maker_order.side == "buy" else book.sells).remove(maker_order)
        drift = self.rng.choice([-1, 0, 0, 1]) * book.step
        book.mid = max(book.mid + drift, 100 * book.step)
        return True

    def park(self) -> bool:
        """Any user places an order far from the market; it rests until cancelled."""
        user = self.user()
        book = self.rng.choice(self.by_user[user] or [_new_book(s, [], []) for s in self.symbols])
        side = self.rng.choice(["buy", "sell"])
        price = book.mid // 2 if side == "buy" else book.mid * 2
        placed = self.order(user, book, side, price, self.rng.randint(1, 20))
        if placed is None:
            return False
        self.parked.append(placed)
        return True

    def unpark(self) -> bool:
        if not self.parked:
            return False
        self.cancel(self.rng.choice(self.parked))
        return True

    def deposit(self, user: int | None = None) -> bool:
        user = self.user() if user is None else user
        books = self.by_user[user]
        if books:
            book = self.rng.choice(books)
            if self.rng.random() < 0.6:
                lots = self.rng.randint(20, 400) if user in self.makers else self.rng.randint(5, 80)
                self.balance("deposit", user, book.symbol.quote.id,
                             book.cost(book.mid, lots * book.lot))
            else:
                self.balance("deposit", user, book.symbol.base.id,
                             self.rng.randint(5, 200) * book.lot)
            return True
        asset = self.rng.choice(sorted(self.registry.assets_by_id.values(), key=lambda a: a.id))
        self.balance("deposit", user, asset.id, self.rng.randint(1, 500) * 10**asset.decimals)
        return True

    def withdraw(self) -> bool:
        user = self.user()
        funded = sorted(asset for (owner, asset), row in self.rows.items()
                        if owner == user and row[0] > 0)
        if not funded:
            return False
        asset = self.rng.choice(funded)
        amount = self.available(user, asset) * self.rng.randint(1, 40) // 100
        self.balance("withdraw", user, asset, max(1, amount))
        return True

    def fund(self) -> None:
        """Every user's first deposits, before it does anything else; market makers also
        open their first quotes."""
        for user in self.users:
            books = self.by_user[user]
            for asset in sorted({a for b in books for a in (b.symbol.base.id, b.symbol.quote.id)}):
                book = next(b for b in books if asset in (b.symbol.base.id, b.symbol.quote.id))
                lots = self.rng.randint(400, 1000) if user in self.makers else self.rng.randint(
                    10, 200)
                # Makers hold about as much base as quote; takers mostly come to buy.
                base_share = 1 if user in self.makers else 4
                amount = (book.cost(book.mid, lots * book.lot) if asset == book.symbol.quote.id
                          else lots * book.lot // base_share)
                self.balance("deposit", user, asset, amount)
            if not books:
                self.deposit(user)
        for book in self.books:
            for _ in range(2 * QUOTES_PER_SIDE * len(book.makers)):
                self.quote()


def _new_book(symbol: Symbol, makers: list[int], takers: list[int]) -> _Book:
    price_scale = 10**symbol.price_decimals
    mid = _START_PRICES.get(symbol.name, 100) * price_scale
    lot_exponent = max(0, symbol.price_decimals + symbol.base.decimals - symbol.quote.decimals,
                       symbol.base.decimals - 3)
    return _Book(symbol, mid, max(1, mid // 10_000), 10**lot_exponent, makers, takers)


# Relative weights of what happens next in the market.
_ACTIONS: Final = (("take", 40), ("quote", 16), ("park", 10), ("unpark", 8),
                   ("deposit", 12), ("withdraw", 14))


def market(registry: Registry, shape: MarketShape) -> Sample:
    """A realistic stream for `shape.partitions` partitions, safe to settle in any order of
    them that keeps each partition's own order (see the module docstring for the promise)."""
    if shape.partitions <= 0 or shape.users <= 0:
        raise ValueError("a market needs at least one partition and one user")
    gen = _Market(registry, shape)
    gen.fund()
    actions = [name for name, _ in _ACTIONS]
    weights = [weight for _, weight in _ACTIONS]
    faults = shape.malformed_rate + shape.duplicate_rate
    while len(gen.valid) < shape.events:
        roll = gen.rng.random()
        if roll < shape.malformed_rate and gen.valid:
            record = _malformed(gen)
            gen.malformed_reasons[str(record.expect)] += 1
            gen.emit(record)
        elif roll < faults and gen.valid:
            original = gen.rng.choice(gen.valid)
            gen.duplicates += 1
            gen.emit(SampleRecord(original.key, original.value, None, duplicate=True))
        elif not getattr(gen, gen.rng.choices(actions, weights)[0])():
            gen.deposit()  # nothing to do for that action yet: someone tops up instead
    open_orders = [o for book in gen.books for o in (*book.buys, *book.sells)] + gen.parked
    return Sample(
        records=gen.records, partitions=shape.partitions, home=dict(gen.home),
        market_makers=gen.makers, open_orders=tuple(sorted(open_orders, key=lambda o: o.order_id)),
        balances={key: (row[0], row[1]) for key, row in gen.rows.items()},
        kinds=gen.kinds, duplicates=gen.duplicates, malformed=gen.malformed_reasons,
    )
