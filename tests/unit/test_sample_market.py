"""The market stream of `settler sample` (settler.ops.sample.market): realistic bookkeeping,
and the promise that makes it safe to settle in any interleaving of its partitions.

Every stream here is replayed through settler's own pure rules (decode, effect_of), the
way the worker plans it: first occurrence of an id settles, later ones are skipped,
invalid records change nothing.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterable

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from settler.config import DEFAULT_REGISTRY
from settler.core.events import Rejected, Trade, decode
from settler.core.registry import load_registry
from settler.core.settlement import effect_of
from settler.ops.sample import MarketShape, Sample, SampleRecord, market, partition_of

REGISTRY = load_registry(DEFAULT_REGISTRY)
MAKE_RUN = MarketShape(events=5000, users=200, partitions=3, duplicate_rate=0.01,
                       malformed_rate=0.002)

Rows = dict[tuple[int, int], tuple[int, int]]


def settle(records: Iterable[SampleRecord]) -> tuple[Rows, list[str]]:
    """Final (available, frozen) per row, and every moment a row went below zero."""
    rows: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
    seen: set[tuple[bool, int]] = set()
    below_zero: list[str] = []
    for record in records:
        event = decode(record.value)
        if isinstance(event, Rejected):
            continue
        ident = (isinstance(event, Trade), event.event_id)
        if ident in seen:
            continue  # a duplicate (skipped) or a conflicting one (dead-lettered)
        seen.add(ident)
        effect = effect_of(event, REGISTRY)
        if isinstance(effect, Rejected):
            continue
        for key, delta in effect.deltas.items():
            row = rows[key]
            row[0] += delta.available
            row[1] += delta.frozen
            if row[0] < 0 or row[1] < 0:
                below_zero.append(f"{key} = {row} after {record.value!r}")
    return {key: (row[0], row[1]) for key, row in rows.items()}, below_zero


def by_partition(sample: Sample) -> dict[int, list[SampleRecord]]:
    partitions: dict[int, list[SampleRecord]] = defaultdict(list)
    for record in sample.records:
        assert record.partition is not None
        partitions[record.partition].append(record)
    return partitions


def interleave(partitions: dict[int, list[SampleRecord]], rng: random.Random
               ) -> list[SampleRecord]:
    """One order a consumer may see: each partition in its own order, partitions mixed
    at random (long runs of one partition included)."""
    queues = {p: list(reversed(records)) for p, records in partitions.items()}
    merged: list[SampleRecord] = []
    while queues:
        p = rng.choice(sorted(queues))
        for _ in range(rng.choice([1, 1, 1, 5, 50])):
            if queues[p]:
                merged.append(queues[p].pop())
        if not queues[p]:
            del queues[p]
    return merged


def valid_bodies(sample: Sample) -> list[dict[str, int | str]]:
    return [json.loads(r.value) for r in sample.records if r.expect is None and not r.duplicate]


shapes = st.builds(
    MarketShape,
    events=st.integers(20, 400),
    users=st.integers(1, 40),
    partitions=st.integers(1, 6),
    market_makers=st.integers(1, 3),
    duplicate_rate=st.sampled_from([0.0, 0.05]),
    malformed_rate=st.sampled_from([0.0, 0.03]),
    seed=st.integers(0, 2**32),
)


@settings(max_examples=60, deadline=None)
@given(shape=shapes)
def test_every_row_stays_non_negative_in_each_partitions_own_order(shape: MarketShape) -> None:
    # The promise itself: a partition's records alone never take a row below zero. Since
    # a row's value at any moment is the sum of what each partition has applied so far,
    # this is exactly what makes every interleaving safe.
    for partition, records in by_partition(market(REGISTRY, shape)).items():
        _, below_zero = settle(records)
        assert not below_zero, f"partition {partition}: {below_zero[:3]}"


@settings(max_examples=60, deadline=None)
@given(shape=shapes, rng=st.randoms(use_true_random=False))
def test_every_row_stays_non_negative_in_any_interleaving_of_partitions(
    shape: MarketShape, rng: random.Random
) -> None:
    sample = market(REGISTRY, shape)
    rows, below_zero = settle(interleave(by_partition(sample), rng))
    assert not below_zero, below_zero[:3]
    assert rows == sample.balances


@settings(max_examples=40, deadline=None)
@given(shape=shapes)
def test_every_record_of_a_user_lands_on_its_home_partition(shape: MarketShape) -> None:
    sample = market(REGISTRY, shape)
    fee_account = REGISTRY.fee_account
    for record in sample.records:
        assert record.partition == partition_of(record.key, shape.partitions)
        if record.expect is not None:
            continue
        body = json.loads(record.value)
        if body["type"] == "trade":
            assert sample.home[body["buyer_user_id"]] == record.partition
            assert sample.home[body["seller_user_id"]] == record.partition
            assert fee_account not in (body["buyer_user_id"], body["seller_user_id"])
        else:
            assert sample.home[body["user_id"]] == record.partition
            assert body["user_id"] != fee_account  # the fee account is only ever credited


def test_partitions_are_the_ones_kafkas_default_partitioner_picks() -> None:
    partitioner = DefaultPartitioner()
    keys = [str(n).encode() for n in range(10_000, 10_500)] + [b"BTC_USDT", b"ETH_USDT", b"1"]
    for count in (1, 2, 3, 4, 7, 12):
        every = list(range(count))
        assert [partition_of(k, count) for k in keys] == [
            partitioner(k, every, every) for k in keys]


def test_open_orders_hold_exactly_what_is_frozen() -> None:
    sample = market(REGISTRY, MAKE_RUN)
    frozen: Counter[tuple[int, int]] = Counter()
    for order in sample.open_orders:
        frozen[(order.user, order.asset)] += order.frozen
    assert sample.open_orders, "a market ends with resting orders"
    assert {key: row[1] for key, row in sample.balances.items() if row[1]} == +frozen


def test_each_trade_spends_exactly_what_the_takers_order_froze() -> None:
    bodies = valid_bodies(market(REGISTRY, MAKE_RUN))
    trades = 0
    for before, trade in itertools.pairwise(bodies):
        if trade["type"] != "trade":
            continue
        trades += 1
        assert before["type"] == "freeze", "a taker's order is placed right before its fill"
        if before["user_id"] == trade["buyer_user_id"]:
            spent = int(trade["quote_amount"]) + int(trade["buyer_refund"])
        else:
            assert before["user_id"] == trade["seller_user_id"]
            spent = int(trade["quantity"]) + int(trade["seller_refund"])
        assert spent == before["amount"]
    assert trades > 1000


def test_users_are_funded_by_a_deposit_before_anything_else() -> None:
    first: dict[int, str] = {}
    for body in valid_bodies(market(REGISTRY, MAKE_RUN)):
        users = ([body["buyer_user_id"], body["seller_user_id"]] if body["type"] == "trade"
                 else [body["user_id"]])
        for user in users:
            first.setdefault(int(user), str(body["type"]))
    assert set(first.values()) == {"deposit"}


def test_market_makers_are_on_many_trades_and_fees_go_to_the_fee_account() -> None:
    sample = market(REGISTRY, MAKE_RUN)
    trades = [b for b in valid_bodies(sample) if b["type"] == "trade"]
    per_maker = Counter(u for t in trades for u in (t["buyer_user_id"], t["seller_user_id"])
                        if u in sample.market_makers)
    assert all(any(u in sample.market_makers for u in (t["buyer_user_id"], t["seller_user_id"]))
               for t in trades)
    assert min(per_maker[m] for m in sample.market_makers) > len(trades) // 10
    fees = [row for (user, _), row in sample.balances.items() if user == REGISTRY.fee_account]
    assert fees and all(available > 0 and frozen == 0 for available, frozen in fees)


def test_duplicates_and_malformed_records_are_optional_and_counted() -> None:
    plain = market(REGISTRY, MarketShape(events=2000))
    assert plain.duplicates == 0 and not plain.malformed
    assert all(r.expect is None and not r.duplicate for r in plain.records)
    faulty = market(REGISTRY, MarketShape(events=2000, duplicate_rate=0.05,
                                          malformed_rate=0.02))
    assert faulty.duplicates == sum(r.duplicate for r in faulty.records) > 0
    assert faulty.malformed == Counter(r.expect for r in faulty.records if r.expect) != Counter()
    valid = len(faulty.records) - faulty.duplicates - sum(faulty.malformed.values())
    assert sum(faulty.kinds.values()) == valid
    assert 2000 <= valid <= 2001  # a taker's order and its fill come as a pair


def test_the_same_seed_gives_the_same_stream() -> None:
    assert market(REGISTRY, MAKE_RUN).records == market(REGISTRY, MAKE_RUN).records
