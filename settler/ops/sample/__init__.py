"""Sample streams for `settler sample` (the README's `make run`), the tests and the benchmarks.

`market()` (market.py) is what `settler sample` publishes: users funded by deposits
before they trade; limit orders that freeze what they may spend (never more than is
available); trades between a taker and a market maker's resting order that spend exactly
what the orders froze (the taker's price improvement and unfilled rest come back with the
trade, fees go to the fee account); cancels that unfreeze what is left; withdrawals within
what is available. Optionally re-sent duplicates and malformed records (faults.py).

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

`generate()` (stream.py) is the older mixed stream the tests, benchmarks and crash
simulation use: random trades, freezes and transfers with Zipf-skewed users and no funding
discipline. Every record of either says what a correct settler must do with it (`expect`),
so a test can check dead-letter reasons one by one.
"""

from __future__ import annotations

from settler.ops.sample.book import Order
from settler.ops.sample.market import MarketShape, Sample, market
from settler.ops.sample.records import SampleRecord, partition_of
from settler.ops.sample.stream import TRADE_SHARE, StreamShape, generate

__all__ = [
    "TRADE_SHARE",
    "MarketShape",
    "Order",
    "Sample",
    "SampleRecord",
    "StreamShape",
    "generate",
    "market",
    "partition_of",
]
