"""SPEC sections 2-3: what each event does to balance rows, and that value is conserved."""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from settler.config import DEFAULT_REGISTRY
from settler.core.amounts import AmountError
from settler.core.events import (
    INT64_MAX,
    BalanceEvent,
    Deposit,
    Freeze,
    Reason,
    Rejected,
    Trade,
    Unfreeze,
    Withdraw,
)
from settler.core.registry import Asset, Registry, Symbol, load_registry
from settler.core.settlement import (
    EMPTY_BALANCE,
    Balance,
    Delta,
    Effect,
    apply,
    effect_of,
)

REGISTRY = load_registry(DEFAULT_REGISTRY)
FEES = REGISTRY.fee_account
BTC, USDT, ETH = 1, 2, 3
BUYER, SELLER = 101, 202
EXECUTED_AT = 1_700_000_000_000

# 0.5 BTC at 150.00 USDT (SPEC section 2): cost 75 USDT = 7_500_000_000 raw.
COST = 7_500_000_000
QUANTITY = 50_000_000


def a_trade(**changes: Any) -> Trade:
    fields: dict[str, Any] = {
        "trade_id": 9001,
        "symbol": "BTC_USDT",
        "buy_order_id": 11,
        "sell_order_id": 12,
        "buyer_user_id": BUYER,
        "seller_user_id": SELLER,
        "base_asset_id": BTC,
        "quote_asset_id": USDT,
        "price": 15_000,
        "quantity": QUANTITY,
        "match_seq": 7,
        "executed_at": EXECUTED_AT,
    }
    return Trade(**{**fields, **changes})


def settled(event: Trade | BalanceEvent, registry: Registry = REGISTRY) -> Effect:
    outcome = effect_of(event, registry)
    assert isinstance(outcome, Effect), outcome
    return outcome


def rejection_reason(event: Trade | BalanceEvent, registry: Registry = REGISTRY) -> Reason | None:
    outcome = effect_of(event, registry)
    return outcome.reason if isinstance(outcome, Rejected) else None


def totals_by_asset(effect: Effect) -> Counter[int]:
    totals: Counter[int] = Counter()
    for (_user, asset), delta in effect.deltas.items():
        totals[asset] += delta.available + delta.frozen
    return totals


FULL_TRADE = a_trade(
    buyer_refund=1_000, seller_refund=2_000, buyer_fee=50_000, seller_fee=7_500_000
)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ((BUYER, USDT), Delta(available=1_000, frozen=-(COST + 1_000))),
        ((BUYER, BTC), Delta(available=QUANTITY - 50_000)),
        ((SELLER, BTC), Delta(available=2_000, frozen=-(QUANTITY + 2_000))),
        ((SELLER, USDT), Delta(available=COST - 7_500_000)),
        ((FEES, BTC), Delta(available=50_000)),
        ((FEES, USDT), Delta(available=7_500_000)),
    ],
    ids=["buyer-quote", "buyer-base", "seller-base", "seller-quote", "fee-base", "fee-quote"],
)
def test_trade_moves_each_row_as_the_spec_table_says(row: tuple[int, int], expected: Delta) -> None:
    effect = settled(FULL_TRADE)

    assert effect.deltas[row] == expected


def test_trade_touches_exactly_the_six_rows_of_the_spec_table() -> None:
    effect = settled(FULL_TRADE)

    assert set(effect.deltas) == {
        (BUYER, USDT),
        (BUYER, BTC),
        (SELLER, BTC),
        (SELLER, USDT),
        (FEES, BTC),
        (FEES, USDT),
    }


def test_trade_effect_carries_the_execution_time_and_the_cost() -> None:
    effect = settled(FULL_TRADE)

    assert (effect.time, effect.cost) == (EXECUTED_AT, COST)


def test_trade_with_a_matching_quote_amount_is_settled() -> None:
    effect = settled(a_trade(quote_amount=COST))

    assert effect.cost == COST


def test_self_trade_merges_buyer_and_seller_rows_into_one_per_asset() -> None:
    trade = a_trade(
        seller_user_id=BUYER,
        buyer_refund=1_000,
        seller_refund=2_000,
        buyer_fee=50_000,
        seller_fee=7_500_000,
    )

    effect = settled(trade)

    assert effect.deltas == {
        (BUYER, USDT): Delta(available=1_000 + COST - 7_500_000, frozen=-(COST + 1_000)),
        (BUYER, BTC): Delta(available=QUANTITY - 50_000 + 2_000, frozen=-(QUANTITY + 2_000)),
        (FEES, BTC): Delta(available=50_000),
        (FEES, USDT): Delta(available=7_500_000),
    }


def test_fee_account_buying_receives_its_own_fee_back_in_one_row() -> None:
    trade = a_trade(buyer_user_id=FEES, buyer_fee=50_000, seller_fee=7_500_000)

    effect = settled(trade)

    assert effect.deltas[(FEES, BTC)] == Delta(available=QUANTITY)
    assert effect.deltas[(FEES, USDT)] == Delta(available=7_500_000, frozen=-COST)
    assert len(effect.deltas) == 4


def test_buyer_fee_equal_to_the_whole_quantity_is_allowed() -> None:
    effect = settled(a_trade(buyer_fee=QUANTITY))

    assert effect.deltas[(BUYER, BTC)] == Delta(available=0)
    assert effect.deltas[(FEES, BTC)] == Delta(available=QUANTITY)


def test_seller_fee_equal_to_the_whole_cost_is_allowed() -> None:
    effect = settled(a_trade(seller_fee=COST))

    assert effect.deltas[(SELLER, USDT)] == Delta(available=0)
    assert effect.deltas[(FEES, USDT)] == Delta(available=COST)


def test_buyer_fee_larger_than_the_quantity_received_is_fee_too_large() -> None:
    assert rejection_reason(a_trade(buyer_fee=QUANTITY + 1)) is Reason.FEE_TOO_LARGE


def test_seller_fee_larger_than_the_cost_received_is_fee_too_large() -> None:
    assert rejection_reason(a_trade(seller_fee=COST + 1)) is Reason.FEE_TOO_LARGE


@pytest.mark.parametrize("quote_amount", [COST - 1, COST + 1, QUANTITY * 15_000])
def test_quote_amount_different_from_the_cost_is_quote_amount_mismatch(quote_amount: int) -> None:
    assert rejection_reason(a_trade(quote_amount=quote_amount)) is Reason.QUOTE_AMOUNT_MISMATCH


@pytest.mark.parametrize("symbol", ["DOGE_USDT", "btc_usdt", "BTCUSDT", ""])
def test_trade_on_a_symbol_missing_from_the_registry_is_unknown_symbol(symbol: str) -> None:
    assert rejection_reason(a_trade(symbol=symbol)) is Reason.UNKNOWN_SYMBOL


@pytest.mark.parametrize(
    ("base", "quote"),
    [(USDT, BTC), (ETH, USDT), (BTC, ETH), (BTC, 99)],
    ids=["swapped", "wrong-base", "wrong-quote", "unknown-quote"],
)
def test_trade_whose_assets_do_not_match_its_symbol_is_asset_mismatch(
    base: int, quote: int
) -> None:
    trade = a_trade(base_asset_id=base, quote_asset_id=quote)

    assert rejection_reason(trade) is Reason.ASSET_MISMATCH


def test_trade_whose_cost_is_not_a_whole_raw_unit_is_inexact_cost() -> None:
    assert rejection_reason(a_trade(price=15_001, quantity=1)) is Reason.INEXACT_COST


def test_trade_whose_cost_does_not_fit_int64_is_overflow() -> None:
    assert rejection_reason(a_trade(price=INT64_MAX, quantity=2)) is Reason.OVERFLOW


@pytest.mark.parametrize("side", ["buyer_refund", "seller_refund"])
def test_trade_whose_refund_plus_amount_does_not_fit_int64_is_overflow(side: str) -> None:
    assert rejection_reason(a_trade(**{side: INT64_MAX})) is Reason.OVERFLOW


@pytest.mark.parametrize("event_type", [Deposit, Withdraw, Freeze, Unfreeze])
def test_balance_event_on_an_asset_missing_from_the_registry_is_unknown_asset(
    event_type: type[BalanceEvent],
) -> None:
    event = event_type(event_id=1, user_id=BUYER, asset_id=99, amount=5, ts=EXECUTED_AT)

    assert rejection_reason(event) is Reason.UNKNOWN_ASSET


@pytest.mark.parametrize(
    ("event_type", "expected"),
    [
        (Deposit, Delta(available=5)),
        (Withdraw, Delta(available=-5)),
        (Freeze, Delta(available=-5, frozen=5)),
        (Unfreeze, Delta(available=5, frozen=-5)),
    ],
)
def test_balance_event_moves_one_row_as_the_spec_says(
    event_type: type[BalanceEvent], expected: Delta
) -> None:
    event = event_type(event_id=1, user_id=BUYER, asset_id=ETH, amount=5, ts=EXECUTED_AT)

    effect = settled(event)

    assert effect.deltas == {(BUYER, ETH): expected}
    assert effect.time == EXECUTED_AT


# --- properties over random valid trades -------------------------------------------------

# (base decimals, quote decimals, price decimals): exponents q - p - b of -10, -2, 0, +2, +10.
SCALES = [(8, 2, 4), (8, 8, 2), (3, 3, 0), (0, 2, 0), (6, 18, 2)]
USERS = st.sampled_from([1, 2, 3, 4])  # small pool: self-trades and fee-account collisions


def registry_with(base_decimals: int, quote_decimals: int, price_decimals: int) -> Registry:
    base, quote = Asset(10, "BASE", base_decimals), Asset(20, "QUOTE", quote_decimals)
    symbol = Symbol("BASE_QUOTE", base, quote, price_decimals)
    return Registry(
        assets_by_id={10: base, 20: quote},
        assets_by_name={"BASE": base, "QUOTE": quote},
        symbols={"BASE_QUOTE": symbol},
        fee_account=1,
    )


@st.composite
def valid_trades(draw: st.DrawFn) -> tuple[Trade, Registry, int]:
    b, q, p = draw(st.sampled_from(SCALES))
    # Bounded so price * quantity * 10^abs(q - p - b) stays below 2^63.
    price = draw(st.integers(min_value=1, max_value=10**4))
    quantity = draw(st.integers(min_value=1, max_value=10**4)) * 10 ** max(0, p + b - q)
    exact_cost = price * quantity * 10**q // 10 ** (p + b)
    refunds = st.integers(min_value=0, max_value=10**12)
    trade = Trade(
        trade_id=draw(st.integers(min_value=1, max_value=INT64_MAX)),
        symbol="BASE_QUOTE",
        buy_order_id=1,
        sell_order_id=2,
        buyer_user_id=draw(USERS),
        seller_user_id=draw(USERS),
        base_asset_id=10,
        quote_asset_id=20,
        price=price,
        quantity=quantity,
        match_seq=0,
        executed_at=draw(st.integers(min_value=0, max_value=INT64_MAX)),
        quote_amount=draw(st.sampled_from([None, exact_cost])),
        buyer_refund=draw(refunds),
        seller_refund=draw(refunds),
        buyer_fee=draw(st.integers(min_value=0, max_value=quantity)),
        seller_fee=draw(st.integers(min_value=0, max_value=exact_cost)),
    )
    return trade, registry_with(b, q, p), exact_cost


@settings(max_examples=300, deadline=None)
@given(case=valid_trades())
def test_a_valid_trade_conserves_the_total_of_each_asset(case: tuple[Trade, Registry, int]) -> None:
    trade, registry, _ = case

    effect = settled(trade, registry)

    assert totals_by_asset(effect) == Counter({10: 0, 20: 0})
    assert {asset for _user, asset in effect.deltas} <= {10, 20}


@settings(max_examples=300, deadline=None)
@given(case=valid_trades())
def test_a_valid_trade_releases_exactly_cost_plus_refund_of_frozen_quote(
    case: tuple[Trade, Registry, int],
) -> None:
    trade, registry, exact_cost = case

    effect = settled(trade, registry)

    quote_frozen = sum(
        delta.frozen for (_user, asset), delta in effect.deltas.items() if asset == 20
    )
    assert effect.cost == exact_cost
    assert quote_frozen == -(exact_cost + trade.buyer_refund)


@settings(max_examples=200, deadline=None)
@given(case=valid_trades(), excess=st.integers(min_value=1, max_value=10**6))
def test_a_buyer_fee_above_the_quantity_is_always_rejected(
    case: tuple[Trade, Registry, int], excess: int
) -> None:
    trade, registry, _ = case
    greedy = msgspec.structs.replace(trade, buyer_fee=trade.quantity + excess)

    assert rejection_reason(greedy, registry) is Reason.FEE_TOO_LARGE


@settings(max_examples=200, deadline=None)
@given(case=valid_trades(), excess=st.integers(min_value=1, max_value=10**6))
def test_a_seller_fee_above_the_cost_is_always_rejected(
    case: tuple[Trade, Registry, int], excess: int
) -> None:
    trade, registry, exact_cost = case
    greedy = msgspec.structs.replace(trade, seller_fee=exact_cost + excess)

    assert rejection_reason(greedy, registry) is Reason.FEE_TOO_LARGE


positive_int64 = st.integers(min_value=1, max_value=INT64_MAX)
non_negative_int64 = st.integers(min_value=0, max_value=INT64_MAX)
SETTLEMENT_REASONS = {
    Reason.UNKNOWN_SYMBOL,
    Reason.ASSET_MISMATCH,
    Reason.INEXACT_COST,
    Reason.OVERFLOW,
    Reason.QUOTE_AMOUNT_MISMATCH,
    Reason.FEE_TOO_LARGE,
}


BREAKABLE = ("symbol", "base_asset_id", "quote_asset_id", "price", "quantity", "quote_amount",
             "buyer_refund", "seller_refund", "buyer_fee", "seller_fee")
BROKEN_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "symbol": st.sampled_from(["ETH_USDT", "BTC_USDT", "XRP_USDT"]),
    "base_asset_id": st.integers(min_value=1, max_value=4),
    "quote_asset_id": st.integers(min_value=1, max_value=4),
    "price": positive_int64,
    "quantity": positive_int64,
    "quote_amount": positive_int64,
    "buyer_refund": non_negative_int64,
    "seller_refund": non_negative_int64,
    "buyer_fee": non_negative_int64,
    "seller_fee": non_negative_int64,
}
MIN_SETTLED_SHARE = 0.5
MIN_REJECTED_SHARE = 0.05


@st.composite
def decodable_trades(draw: st.DrawFn) -> Trade:
    """A valid trade on the default registry, then (about one time in four) one or two of
    its fields replaced by any value the decoder would accept."""
    symbol = draw(st.sampled_from(sorted(REGISTRY.symbols.values(), key=lambda s: s.name)))
    base, quote, p = symbol.base.decimals, symbol.quote.decimals, symbol.price_decimals
    price = draw(st.integers(min_value=1, max_value=10**9))
    quantity = draw(st.integers(min_value=1, max_value=10**6)) * 10 ** max(0, p + base - quote)
    exact_cost = price * quantity * 10**quote // 10 ** (p + base)
    fields: dict[str, Any] = {
        "symbol": symbol.name,
        "base_asset_id": symbol.base.id,
        "quote_asset_id": symbol.quote.id,
        "price": price,
        "quantity": quantity,
        "quote_amount": draw(st.sampled_from([None, exact_cost])),
        "buyer_refund": draw(st.integers(min_value=0, max_value=10**12)),
        "seller_refund": draw(st.integers(min_value=0, max_value=10**12)),
        "buyer_fee": draw(st.integers(min_value=0, max_value=quantity)),
        "seller_fee": draw(st.integers(min_value=0, max_value=exact_cost)),
        "buyer_user_id": draw(USERS),
        "seller_user_id": draw(USERS),
    }
    if draw(st.integers(min_value=0, max_value=3)) == 0:
        for name in draw(st.lists(st.sampled_from(BREAKABLE), min_size=1, max_size=2)):
            fields[name] = draw(BROKEN_VALUES[name])
    return a_trade(**fields)


def test_any_decodable_trade_is_either_settled_conserving_value_or_rejected_with_a_reason(
) -> None:
    # Counted across examples so that the property provably exercises both branches: a
    # generator that only produces rejections would check nothing about conservation.
    outcomes: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(trade=decodable_trades())
    def either_conserving_or_rejected(trade: Trade) -> None:
        outcome = effect_of(trade, REGISTRY)

        if isinstance(outcome, Rejected):
            assert outcome.reason in SETTLEMENT_REASONS
            outcomes["rejected"] += 1
        else:
            assert set(totals_by_asset(outcome).values()) == {0}
            outcomes["settled"] += 1

    either_conserving_or_rejected()

    examples = outcomes.total()
    assert outcomes["settled"] >= MIN_SETTLED_SHARE * examples, outcomes
    assert outcomes["rejected"] >= MIN_REJECTED_SHARE * examples, outcomes


balance_events = st.builds(
    lambda cls, user, asset, amount, ts: cls(
        event_id=1, user_id=user, asset_id=asset, amount=amount, ts=ts
    ),
    st.sampled_from([Deposit, Withdraw, Freeze, Unfreeze]),
    positive_int64,
    st.sampled_from([BTC, USDT, ETH]),
    positive_int64,
    non_negative_int64,
)
TOTAL_CHANGE = {Deposit: 1, Withdraw: -1, Freeze: 0, Unfreeze: 0}


@settings(max_examples=200, deadline=None)
@given(event=balance_events)
def test_only_deposits_and_withdrawals_change_an_assets_total_by_exactly_their_amount(
    event: BalanceEvent,
) -> None:
    effect = settled(event)

    assert totals_by_asset(effect) == Counter(
        {event.asset_id: TOTAL_CHANGE[type(event)] * event.amount}
    )


# --- apply: one row after one event ------------------------------------------------------


def test_apply_adds_the_delta_bumps_the_version_and_stamps_the_event_time() -> None:
    before = Balance(available=100, frozen=40, version=6, updated_at=1)

    after = apply(before, Delta(available=-10, frozen=25), EXECUTED_AT)

    assert after == Balance(available=90, frozen=65, version=7, updated_at=EXECUTED_AT)


def test_apply_to_a_missing_row_starts_from_zero_at_version_one() -> None:
    after = apply(EMPTY_BALANCE, Delta(available=5), EXECUTED_AT)

    assert after == Balance(available=5, frozen=0, version=1, updated_at=EXECUTED_AT)


def test_apply_lets_a_row_go_negative_and_flags_it() -> None:
    after = apply(EMPTY_BALANCE, Delta(available=-5), EXECUTED_AT)

    assert after.available == -5
    assert after.is_negative


@pytest.mark.parametrize(
    ("before", "delta"),
    [
        (Balance(INT64_MAX, 0, 1, 0), Delta(available=1)),
        (Balance(0, INT64_MAX, 1, 0), Delta(frozen=1)),
        (Balance(-(2**63), 0, 1, 0), Delta(available=-1)),
        (Balance(0, 0, INT64_MAX, 0), Delta(available=1)),
    ],
    ids=["available", "frozen", "available-below-min", "version"],
)
def test_apply_raises_overflow_when_a_column_would_leave_bigint(
    before: Balance, delta: Delta
) -> None:
    with pytest.raises(AmountError) as caught:
        apply(before, delta, EXECUTED_AT)

    assert caught.value.reason is Reason.OVERFLOW


int64 = st.integers(min_value=-(2**63), max_value=INT64_MAX)
small = st.integers(min_value=-(10**15), max_value=10**15)


@settings(max_examples=200, deadline=None)
@given(
    available=int64.filter(lambda v: abs(v) < 2**62),
    frozen=int64.filter(lambda v: abs(v) < 2**62),
    version=st.integers(min_value=0, max_value=2**62),
    delta=st.builds(Delta, small, small),
    time=non_negative_int64,
)
def test_apply_increments_version_by_exactly_one_and_moves_exactly_the_delta(
    available: int, frozen: int, version: int, delta: Delta, time: int
) -> None:
    after = apply(Balance(available, frozen, version, 0), delta, time)

    assert after == Balance(available + delta.available, frozen + delta.frozen, version + 1, time)
