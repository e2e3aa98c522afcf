"""SPEC section 1: decoding Kafka record values into events, or the reason they are invalid."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from settler.core.events import (
    INT64_MAX,
    Deposit,
    Event,
    Freeze,
    Reason,
    Rejected,
    Trade,
    Unfreeze,
    Withdraw,
    decode,
    digest,
    encode,
    kind,
)

TRADE_FIELDS: dict[str, Any] = {
    "type": "trade",
    "trade_id": 9001,
    "symbol": "BTC_USDT",
    "buy_order_id": 11,
    "sell_order_id": 12,
    "buyer_user_id": 101,
    "seller_user_id": 202,
    "base_asset_id": 1,
    "quote_asset_id": 2,
    "price": 15_000,
    "quantity": 50_000_000,
    "match_seq": 7,
    "executed_at": 1_700_000_000_000,
}
REQUIRED_TRADE_FIELDS = [name for name in TRADE_FIELDS if name != "type"]

DEPOSIT_FIELDS: dict[str, Any] = {
    "type": "deposit",
    "event_id": 5001,
    "user_id": 101,
    "asset_id": 2,
    "amount": 1_000_000,
    "ts": 1_700_000_000_000,
}
REQUIRED_BALANCE_FIELDS = [name for name in DEPOSIT_FIELDS if name != "type"]

INT_FIELDS = ["trade_id", "buy_order_id", "buyer_user_id", "price", "quantity", "match_seq"]


def record(fields: dict[str, Any], **changes: Any) -> bytes:
    return json.dumps({**fields, **changes}).encode()


def without(fields: dict[str, Any], name: str) -> bytes:
    return json.dumps({key: value for key, value in fields.items() if key != name}).encode()


def rejection_reason(value: bytes | None) -> Reason | None:
    outcome = decode(value)
    return outcome.reason if isinstance(outcome, Rejected) else None


def test_a_trade_record_decodes_to_a_trade_with_every_field() -> None:
    event = decode(record(TRADE_FIELDS))

    assert event == Trade(
        trade_id=9001,
        symbol="BTC_USDT",
        buy_order_id=11,
        sell_order_id=12,
        buyer_user_id=101,
        seller_user_id=202,
        base_asset_id=1,
        quote_asset_id=2,
        price=15_000,
        quantity=50_000_000,
        match_seq=7,
        executed_at=1_700_000_000_000,
    )


def test_optional_trade_fields_default_to_no_quote_amount_and_zero_refunds_and_fees() -> None:
    trade = decode(record(TRADE_FIELDS))

    assert isinstance(trade, Trade)
    assert trade.quote_amount is None
    assert (trade.buyer_refund, trade.seller_refund) == (0, 0)
    assert (trade.buyer_fee, trade.seller_fee) == (0, 0)


def test_optional_trade_fields_are_read_when_present() -> None:
    trade = decode(
        record(
            TRADE_FIELDS,
            quote_amount=7_500_000_000,
            buyer_refund=3,
            seller_refund=4,
            buyer_fee=5,
            seller_fee=6,
        )
    )

    assert isinstance(trade, Trade)
    assert (trade.quote_amount, trade.buyer_refund, trade.seller_refund) == (7_500_000_000, 3, 4)
    assert (trade.buyer_fee, trade.seller_fee) == (5, 6)


def test_trade_id_is_the_idempotency_key_and_executed_at_its_time() -> None:
    trade = decode(record(TRADE_FIELDS))

    assert isinstance(trade, Trade)
    assert (trade.event_id, trade.time) == (9001, 1_700_000_000_000)


@pytest.mark.parametrize(
    ("type_tag", "cls"),
    [("deposit", Deposit), ("withdraw", Withdraw), ("freeze", Freeze), ("unfreeze", Unfreeze)],
)
def test_balance_event_records_decode_to_their_type_and_kind(
    type_tag: str, cls: type[Event]
) -> None:
    event = decode(record(DEPOSIT_FIELDS, type=type_tag))

    assert type(event) is cls
    assert kind(event) == type_tag
    assert (event.event_id, event.time) == (5001, 1_700_000_000_000)


def test_kind_of_a_trade_is_trade() -> None:
    trade = decode(record(TRADE_FIELDS))

    assert isinstance(trade, Trade)
    assert kind(trade) == "trade"


def test_unknown_extra_fields_are_ignored() -> None:
    noisy = record(TRADE_FIELDS, venue="X", fees={"maker": [1, 2.5, None]}, note="hi")

    assert decode(noisy) == decode(record(TRADE_FIELDS))


def test_ids_and_amounts_up_to_int64_max_are_accepted() -> None:
    event = decode(record(DEPOSIT_FIELDS, event_id=INT64_MAX, amount=INT64_MAX))

    assert isinstance(event, Deposit)
    assert (event.event_id, event.amount) == (INT64_MAX, INT64_MAX)


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"{",
        b"not json",
        b"\xff\xfe{}",
        b"[1, 2]",
        b'"trade"',
        b"42",
        b"null",
        record(DEPOSIT_FIELDS) + b" trailing",
    ],
    ids=[
        "no-value",
        "empty",
        "truncated",
        "not-json",
        "not-utf8",
        "array",
        "string",
        "number",
        "null",
        "trailing-garbage",
    ],
)
def test_bytes_that_are_not_a_json_object_are_undecodable(value: bytes | None) -> None:
    assert rejection_reason(value) is Reason.UNDECODABLE


@pytest.mark.parametrize("field", ["symbol", "type"])
def test_invalid_utf8_inside_a_string_field_is_undecodable(field: str) -> None:
    value = record(TRADE_FIELDS, **{field: "@@"}).replace(b"@@", b"\xc3\x28")

    assert rejection_reason(value) is Reason.UNDECODABLE


def test_deeply_nested_json_is_undecodable_rather_than_an_exception() -> None:
    depth = 5_000
    value = record(DEPOSIT_FIELDS, note="@@").replace(b'"@@"', b"[" * depth + b"]" * depth)

    assert rejection_reason(value) is Reason.UNDECODABLE


@pytest.mark.parametrize("type_tag", ["bogus", "Trade", "DEPOSIT", "transfer", ""])
def test_an_unknown_type_tag_is_unknown_type(type_tag: str) -> None:
    assert rejection_reason(record(DEPOSIT_FIELDS, type=type_tag)) is Reason.UNKNOWN_TYPE


def test_a_record_without_a_type_is_missing_field() -> None:
    assert rejection_reason(without(DEPOSIT_FIELDS, "type")) is Reason.MISSING_FIELD


@pytest.mark.parametrize("name", REQUIRED_TRADE_FIELDS)
def test_a_trade_without_a_required_field_is_missing_field(name: str) -> None:
    outcome = decode(without(TRADE_FIELDS, name))

    assert isinstance(outcome, Rejected)
    assert outcome.reason is Reason.MISSING_FIELD
    assert name in outcome.detail


@pytest.mark.parametrize("type_tag", ["deposit", "withdraw", "freeze", "unfreeze"])
@pytest.mark.parametrize("name", REQUIRED_BALANCE_FIELDS)
def test_a_balance_event_without_a_required_field_is_missing_field(
    type_tag: str, name: str
) -> None:
    value = without({**DEPOSIT_FIELDS, "type": type_tag}, name)

    assert rejection_reason(value) is Reason.MISSING_FIELD


@pytest.mark.parametrize(
    "bad_value",
    [1.0, 1.5, 1e3, "1", True, False, None, [1], {"v": 1}],
    ids=["float-whole", "float", "exponent", "string", "true", "false", "null", "list", "dict"],
)
@pytest.mark.parametrize("name", INT_FIELDS)
def test_a_non_integer_where_an_integer_belongs_is_wrong_type(name: str, bad_value: Any) -> None:
    outcome = decode(record(TRADE_FIELDS, **{name: bad_value}))

    assert isinstance(outcome, Rejected)
    assert outcome.reason is Reason.WRONG_TYPE
    assert name in outcome.detail


@pytest.mark.parametrize("bad_value", [1.5, "1", True], ids=["float", "string", "bool"])
def test_a_non_integer_optional_fee_is_wrong_type(bad_value: Any) -> None:
    assert rejection_reason(record(TRADE_FIELDS, buyer_fee=bad_value)) is Reason.WRONG_TYPE


@pytest.mark.parametrize("bad_value", [42, None, ["BTC_USDT"]], ids=["int", "null", "list"])
def test_a_non_string_symbol_is_wrong_type(bad_value: Any) -> None:
    assert rejection_reason(record(TRADE_FIELDS, symbol=bad_value)) is Reason.WRONG_TYPE


@pytest.mark.parametrize(
    "bad_value",
    [0, -1, -(2**63), 2**63, 2**64, 10**30],
    ids=["zero", "negative", "int64-min", "int64-max-plus-1", "uint64-overflow", "huge"],
)
@pytest.mark.parametrize(
    "name", ["trade_id", "buyer_user_id", "base_asset_id", "price", "quantity"]
)
def test_ids_and_amounts_outside_1_to_int64_max_are_bad_range(name: str, bad_value: int) -> None:
    assert rejection_reason(record(TRADE_FIELDS, **{name: bad_value})) is Reason.BAD_RANGE


def test_an_integer_with_thousands_of_digits_is_bad_range() -> None:
    value = record(DEPOSIT_FIELDS, amount=1).replace(b'"amount": 1', b'"amount": ' + b"9" * 5_000)

    assert rejection_reason(value) is Reason.BAD_RANGE


@pytest.mark.parametrize("name", ["amount", "event_id", "user_id", "asset_id"])
def test_a_zero_balance_amount_or_id_is_bad_range(name: str) -> None:
    assert rejection_reason(record(DEPOSIT_FIELDS, **{name: 0})) is Reason.BAD_RANGE


@pytest.mark.parametrize(
    "name", ["buyer_refund", "seller_refund", "buyer_fee", "seller_fee", "match_seq"]
)
def test_zero_is_allowed_for_refunds_fees_and_match_seq(name: str) -> None:
    assert isinstance(decode(record(TRADE_FIELDS, **{name: 0})), Trade)


@pytest.mark.parametrize(
    "name",
    ["buyer_refund", "seller_refund", "buyer_fee", "seller_fee", "match_seq", "executed_at"],
)
@pytest.mark.parametrize("bad_value", [-1, 2**63], ids=["negative", "above-int64"])
def test_negative_or_oversized_refunds_fees_and_counters_are_bad_range(
    name: str, bad_value: int
) -> None:
    assert rejection_reason(record(TRADE_FIELDS, **{name: bad_value})) is Reason.BAD_RANGE


def test_a_zero_quote_amount_is_bad_range() -> None:
    assert rejection_reason(record(TRADE_FIELDS, quote_amount=0)) is Reason.BAD_RANGE


def test_digest_ignores_key_order() -> None:
    reordered = json.dumps(dict(reversed(list(TRADE_FIELDS.items())))).encode()

    assert digest(_decoded(reordered)) == digest(_decoded(record(TRADE_FIELDS)))


def test_digest_ignores_unknown_fields() -> None:
    noisy = record(TRADE_FIELDS, venue="X", comment="resent")

    assert digest(_decoded(noisy)) == digest(_decoded(record(TRADE_FIELDS)))


def test_digest_treats_explicit_default_values_like_omitted_ones() -> None:
    explicit = record(TRADE_FIELDS, buyer_refund=0, seller_refund=0, buyer_fee=0, seller_fee=0)

    assert digest(_decoded(explicit)) == digest(_decoded(record(TRADE_FIELDS)))


@pytest.mark.parametrize(
    "change",
    [
        {"price": 15_001},
        {"quantity": 50_000_001},
        {"buyer_user_id": 102},
        {"symbol": "ETH_USDT"},
        {"buyer_fee": 1},
        {"quote_amount": 7_500_000_000},
        {"executed_at": 1_700_000_000_001},
    ],
)
def test_digest_differs_when_any_content_differs(change: dict[str, Any]) -> None:
    assert digest(_decoded(record(TRADE_FIELDS, **change))) != digest(
        _decoded(record(TRADE_FIELDS))
    )


def test_digest_differs_between_event_types_with_the_same_fields() -> None:
    deposit = _decoded(record(DEPOSIT_FIELDS, type="deposit"))
    withdraw = _decoded(record(DEPOSIT_FIELDS, type="withdraw"))

    assert digest(deposit) != digest(withdraw)


positive_ids = st.integers(min_value=1, max_value=INT64_MAX)
balance_records = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["deposit", "withdraw", "freeze", "unfreeze"]),
        "event_id": positive_ids,
        "user_id": positive_ids,
        "asset_id": positive_ids,
        "amount": positive_ids,
        "ts": st.integers(min_value=0, max_value=INT64_MAX),
    }
)
unknown_fields = st.dictionaries(
    st.text(min_size=1, max_size=8).filter(lambda key: key not in DEPOSIT_FIELDS),
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
    max_size=3,
)


@settings(max_examples=150, deadline=None)
@given(fields=balance_records, extra=unknown_fields, order=st.randoms(use_true_random=False))
def test_digest_is_the_same_for_any_key_order_and_unknown_fields(
    fields: dict[str, Any], extra: dict[str, Any], order: Any
) -> None:
    items = list({**fields, **extra}.items())
    order.shuffle(items)

    resent = _decoded(json.dumps(dict(items)).encode())

    assert digest(resent) == digest(_decoded(json.dumps(fields).encode()))


@settings(max_examples=150, deadline=None)
@given(
    fields=balance_records,
    name=st.sampled_from(["event_id", "user_id", "asset_id", "amount", "ts"]),
)
def test_digest_changes_when_any_balance_field_changes(fields: dict[str, Any], name: str) -> None:
    changed = {**fields, name: fields[name] - 1 if fields[name] > 1 else fields[name] + 1}

    original = _decoded(json.dumps(fields).encode())

    assert digest(_decoded(json.dumps(changed).encode())) != digest(original)


@settings(max_examples=150, deadline=None)
@given(fields=balance_records)
def test_encoding_then_decoding_gives_back_the_same_event(fields: dict[str, Any]) -> None:
    event = _decoded(json.dumps(fields).encode())

    assert decode(encode(event)) == event


def _decoded(value: bytes) -> Event:
    outcome = decode(value)
    assert not isinstance(outcome, Rejected), outcome
    return outcome
