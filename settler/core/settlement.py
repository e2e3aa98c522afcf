"""The settlement rules (SPEC sections 2-3) as pure functions: no Kafka, no CQL, no clock.

event + registry -> `Effect` (signed deltas per balance row) or `Invalid(reason)`;
balance + delta -> new balance. Every trade effect conserves each asset; deposits and
withdrawals change an asset's total by exactly their amount.
"""

from __future__ import annotations

from typing import NamedTuple

from settler.core.amounts import INT64_MIN, AmountError, checked_int64, cost
from settler.core.events import (
    INT64_MAX,
    BalanceEvent,
    Deposit,
    Event,
    Freeze,
    Reason,
    Rejected,
    Trade,
    Unfreeze,
    Withdraw,
)
from settler.core.registry import Registry

RowKey = tuple[int, int]
"""(user_id, asset_id): one row of user_balances."""


# Tuples, not frozen dataclasses: several are made per event on the writer's hot path.
class Delta(NamedTuple):
    available: int = 0
    frozen: int = 0

    def __add__(self, other: tuple[int, ...]) -> Delta:  # type: ignore[override]
        assert isinstance(other, Delta)
        return Delta(self.available + other.available, self.frozen + other.frozen)


class Effect(NamedTuple):
    """What one event does: a delta per touched row (a row touched twice, as in a
    self-trade, appears once with the sum), the event's time, and a trade's cost."""

    deltas: dict[RowKey, Delta]
    time: int
    cost: int = 0


class Balance(NamedTuple):
    available: int
    frozen: int
    version: int
    updated_at: int

    @property
    def is_negative(self) -> bool:
        return self.available < 0 or self.frozen < 0


EMPTY_BALANCE = Balance(0, 0, 0, 0)


def effect_of(event: Event, registry: Registry) -> Effect | Rejected:
    """The rows an event moves and by how much, or why it can never be settled."""
    try:
        if isinstance(event, Trade):
            return trade_effect(event, registry)
        return balance_effect(event, registry)
    except AmountError as exc:
        return Rejected(exc.reason, exc.detail)


def trade_effect(trade: Trade, registry: Registry) -> Effect:
    symbol = registry.symbol(trade.symbol)
    if symbol is None:
        raise AmountError(Reason.UNKNOWN_SYMBOL, f"unknown symbol {trade.symbol!r}")
    if (trade.base_asset_id, trade.quote_asset_id) != (symbol.base.id, symbol.quote.id):
        raise AmountError(
            Reason.ASSET_MISMATCH,
            f"{symbol.name} trades {symbol.base.id}/{symbol.quote.id}, event says "
            f"{trade.base_asset_id}/{trade.quote_asset_id}",
        )
    paid = cost(
        trade.price,
        trade.quantity,
        base_decimals=symbol.base.decimals,
        quote_decimals=symbol.quote.decimals,
        price_decimals=symbol.price_decimals,
    )
    if trade.quote_amount is not None and trade.quote_amount != paid:
        raise AmountError(
            Reason.QUOTE_AMOUNT_MISMATCH, f"quote_amount {trade.quote_amount} != cost {paid}"
        )
    if trade.buyer_fee > trade.quantity:
        raise AmountError(Reason.FEE_TOO_LARGE, "buyer_fee exceeds the quantity received")
    if trade.seller_fee > paid:
        raise AmountError(Reason.FEE_TOO_LARGE, "seller_fee exceeds the cost received")
    buyer_quote_frozen = paid + trade.buyer_refund
    seller_base_frozen = trade.quantity + trade.seller_refund
    if buyer_quote_frozen > INT64_MAX or seller_base_frozen > INT64_MAX:
        raise AmountError(Reason.OVERFLOW, "refund plus amount exceeds 2^63-1")

    base, quote = symbol.base.id, symbol.quote.id
    buyer, seller, fees = trade.buyer_user_id, trade.seller_user_id, registry.fee_account
    moves: list[tuple[RowKey, Delta]] = [
        # Funds were frozen when the orders were placed: the trade spends frozen funds
        # and returns any over-reservation (price improvement) to available.
        ((buyer, quote), Delta(available=trade.buyer_refund, frozen=-buyer_quote_frozen)),
        ((buyer, base), Delta(available=trade.quantity - trade.buyer_fee)),
        ((seller, base), Delta(available=trade.seller_refund, frozen=-seller_base_frozen)),
        ((seller, quote), Delta(available=paid - trade.seller_fee)),
    ]
    if trade.buyer_fee:
        moves.append(((fees, base), Delta(available=trade.buyer_fee)))
    if trade.seller_fee:
        moves.append(((fees, quote), Delta(available=trade.seller_fee)))
    return Effect(_merge(moves), trade.executed_at, paid)


def balance_effect(event: BalanceEvent, registry: Registry) -> Effect:
    if registry.asset(event.asset_id) is None:
        raise AmountError(Reason.UNKNOWN_ASSET, f"unknown asset id {event.asset_id}")
    amount = event.amount
    delta: Delta
    if isinstance(event, Deposit):
        delta = Delta(available=amount)
    elif isinstance(event, Withdraw):
        delta = Delta(available=-amount)
    elif isinstance(event, Freeze):
        delta = Delta(available=-amount, frozen=amount)
    else:
        assert isinstance(event, Unfreeze)
        delta = Delta(available=amount, frozen=-amount)
    return Effect({(event.user_id, event.asset_id): delta}, event.ts)


def _merge(moves: list[tuple[RowKey, Delta]]) -> dict[RowKey, Delta]:
    merged: dict[RowKey, Delta] = {}
    for key, delta in moves:
        merged[key] = merged[key] + delta if key in merged else delta
    return merged


def apply(balance: Balance, delta: Delta, time: int) -> Balance:
    """The row after one event: amounts moved, version + 1, updated_at = the event's time.

    Raises AmountError(overflow) if a result does not fit CQL bigint; negative results
    are allowed here (the engine upstream is the authority on funds) and flagged by the
    caller as anomalies.
    """
    return Balance(*moved(balance.available, balance.frozen, balance.version, delta), time)


def moved(available: int, frozen: int, version: int, delta: Delta) -> tuple[int, int, int]:
    """`apply` without the tuples around it, for the writer's hot path: (available, frozen,
    version) after the event."""
    available += delta[0]
    frozen += delta[1]
    version += 1
    if not (INT64_MIN <= available <= INT64_MAX and INT64_MIN <= frozen <= INT64_MAX
            and version <= INT64_MAX):
        checked_int64(available, "available")
        checked_int64(frozen, "frozen")
        checked_int64(version, "version")
    return available, frozen, version
