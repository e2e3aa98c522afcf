"""The market stream of `settler sample` (`market`): sets up users on their home partitions
and one order book per symbol where its makers and takers live, then draws what happens
next (trading.py, funding.py) and the faults asked for, until enough valid events are out.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from settler.core.registry import Registry
from settler.ops.sample import faults
from settler.ops.sample.book import Book, Order, new_book
from settler.ops.sample.funding import Funding
from settler.ops.sample.records import Ids, SampleRecord, partition_of
from settler.ops.sample.tape import Tape
from settler.ops.sample.trading import Trading
from settler.ops.sample.wallets import Wallets


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


# Relative weights of what happens next in the market.
_ACTIONS: Final = (("take", 40), ("quote", 16), ("park", 10), ("unpark", 8),
                   ("deposit", 12), ("withdraw", 14))


def market(registry: Registry, shape: MarketShape) -> Sample:
    """A realistic stream for `shape.partitions` partitions, safe to settle in any order of
    them that keeps each partition's own order (see the package docstring for the promise)."""
    if shape.partitions <= 0 or shape.users <= 0:
        raise ValueError("a market needs at least one partition and one user")
    tape = Tape(random.Random(shape.seed), Ids(shape.first_trade_id, shape.first_event_id),
                shape.partitions, [shape.user_offset + n for n in range(1, shape.users + 1)],
                sorted(registry.symbols.values(), key=lambda s: s.name))
    if registry.fee_account in tape.users:
        raise ValueError("the sample's user ids include the fee account")
    home = {u: partition_of(str(u).encode(), shape.partitions) for u in tape.users}
    books, makers = _open_books(tape, home, shape.market_makers)
    wallets = Wallets(tape, registry.fee_account)
    trading = Trading(tape, wallets, books,
                      {u: [b for b in books if u in b.makers or u in b.takers]
                       for u in tape.users}, shape.first_order_id)
    funding = Funding(tape, wallets, trading, registry, makers)
    funding.fund()
    actions: dict[str, Callable[[], bool]] = {
        "take": trading.take, "quote": trading.quote, "park": trading.park,
        "unpark": trading.unpark, "deposit": funding.deposit, "withdraw": funding.withdraw}
    names = [name for name, _ in _ACTIONS]
    weights = [weight for _, weight in _ACTIONS]
    faulty = shape.malformed_rate + shape.duplicate_rate
    while len(tape.valid) < shape.events:
        roll = tape.rng.random()
        if roll < shape.malformed_rate and tape.valid:
            record = faults.malformed(tape)
            tape.malformed[str(record.expect)] += 1
            tape.emit(record)
        elif roll < faulty and tape.valid:
            original = tape.rng.choice(tape.valid)
            tape.duplicates += 1
            tape.emit(SampleRecord(original.key, original.value, None, duplicate=True))
        elif not actions[tape.rng.choices(names, weights)[0]]():
            funding.deposit()  # nothing to do for that action yet: someone tops up instead
    return Sample(
        records=tape.records, partitions=shape.partitions, home=home, market_makers=makers,
        open_orders=tuple(trading.open_orders()),
        balances={key: (row[0], row[1]) for key, row in wallets.rows.items()},
        kinds=tape.kinds, duplicates=tape.duplicates, malformed=tape.malformed,
    )


def _open_books(tape: Tape, home: dict[int, int], market_makers: int
                ) -> tuple[list[Book], tuple[int, ...]]:
    """One book per symbol, traded by the users homed on the symbol's partition: the first
    few of them make the market, the rest take. Partitions where no symbol lands, or with
    fewer than two users, carry wallet activity and cancelled orders only."""
    books: list[Book] = []
    makers: list[int] = []
    for partition in range(tape.partitions):
        symbols = [s for s in tape.symbols
                   if partition_of(s.name.encode(), tape.partitions) == partition]
        local = [u for u in tape.users if home[u] == partition]
        if not symbols or len(local) < 2:
            continue
        count = max(1, min(market_makers, len(local) - 1))
        makers += local[:count]
        for symbol in symbols:
            books.append(new_book(symbol, local[:count], local[count:]))
    return books, tuple(makers)
