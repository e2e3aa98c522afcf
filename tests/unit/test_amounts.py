"""SPEC section 2: exact fixed-point cost, int64 bounds, decimal strings for people."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from settler.core.amounts import (
    INT64_MAX,
    INT64_MIN,
    AmountError,
    checked_int64,
    cost,
    parse_decimal,
    to_decimal_string,
)
from settler.core.events import Reason

decimals = st.integers(min_value=0, max_value=18)
positive_int64 = st.one_of(
    st.integers(min_value=1, max_value=10**9),
    st.integers(min_value=1, max_value=INT64_MAX),
)
int64 = st.integers(min_value=INT64_MIN, max_value=INT64_MAX)


def test_half_a_bitcoin_at_150_usdt_costs_75_usdt_in_raw_units() -> None:
    paid = cost(15_000, 50_000_000, base_decimals=8, quote_decimals=8, price_decimals=2)

    assert paid == 7_500_000_000
    assert type(paid) is int
    assert to_decimal_string(paid, 8) == "75"


def test_cost_scales_up_when_the_quote_has_more_decimals_than_price_and_base() -> None:
    # 3 whole units of a 0-decimal asset at 150.00 in an 8-decimal quote: 450 quote units.
    paid = cost(15_000, 3, base_decimals=0, quote_decimals=8, price_decimals=2)

    assert paid == 45_000_000_000


def test_cost_that_would_need_rounding_is_rejected_as_inexact() -> None:
    # 1 satoshi at 0.01 USDT costs 10^-10 USDT: not representable in 8 decimals.
    with pytest.raises(AmountError) as caught:
        cost(1, 1, base_decimals=8, quote_decimals=8, price_decimals=2)

    assert caught.value.reason is Reason.INEXACT_COST


def test_cost_with_a_fraction_of_a_raw_quote_unit_is_rejected_rather_than_rounded_down() -> None:
    # 1 satoshi at 150.01 costs 150.01 raw USDT units.
    with pytest.raises(AmountError) as caught:
        cost(15_001, 1, base_decimals=8, quote_decimals=8, price_decimals=2)

    assert caught.value.reason is Reason.INEXACT_COST


def test_price_times_quantity_above_int64_is_overflow_even_if_scaling_would_shrink_it() -> None:
    # 2^62 * 4 = 2^64 before dividing by 100: the intermediate already does not fit.
    with pytest.raises(AmountError) as caught:
        cost(2**62, 4, base_decimals=8, quote_decimals=8, price_decimals=2)

    assert caught.value.reason is Reason.OVERFLOW


def test_cost_above_int64_after_scaling_up_is_overflow() -> None:
    with pytest.raises(AmountError) as caught:
        cost(10**12, 10**6, base_decimals=0, quote_decimals=18, price_decimals=0)

    assert caught.value.reason is Reason.OVERFLOW


def test_cost_of_exactly_int64_max_is_accepted() -> None:
    paid = cost(INT64_MAX, 1, base_decimals=8, quote_decimals=8, price_decimals=0)

    assert paid == INT64_MAX


def test_cost_is_exact_where_a_float_would_lose_the_last_unit() -> None:
    # 2^53 + 1 is the first integer a float cannot represent.
    paid = cost(2**53 + 1, 3, base_decimals=0, quote_decimals=0, price_decimals=0)

    assert paid == 3 * (2**53 + 1)
    assert paid != int(float(2**53 + 1) * 3)


@settings(max_examples=400, deadline=None)
@given(price=positive_int64, quantity=positive_int64, b=decimals, q=decimals, p=decimals)
@example(price=15_000, quantity=50_000_000, b=8, q=8, p=2)
def test_cost_is_exact_or_rejected_with_the_right_reason(
    price: int, quantity: int, b: int, q: int, p: int
) -> None:
    exact = Fraction(price * quantity * 10**q, 10 ** (p + b))
    if price * quantity > INT64_MAX:
        expected: int | Reason = Reason.OVERFLOW
    elif exact.denominator != 1:
        expected = Reason.INEXACT_COST
    elif exact > INT64_MAX:
        expected = Reason.OVERFLOW
    else:
        expected = int(exact)

    try:
        outcome: int | Reason = cost(
            price, quantity, base_decimals=b, quote_decimals=q, price_decimals=p
        )
    except AmountError as exc:
        outcome = exc.reason

    assert outcome == expected
    assert type(outcome) is type(expected)


@settings(max_examples=300, deadline=None)
@given(
    price=st.integers(min_value=1, max_value=10**4),
    units=st.integers(min_value=1, max_value=10**4),
    b=st.integers(min_value=0, max_value=6),
    q=st.integers(min_value=0, max_value=6),
    p=st.integers(min_value=0, max_value=2),
)
def test_successful_cost_times_scale_equals_price_times_quantity(
    price: int, units: int, b: int, q: int, p: int
) -> None:
    # Quantity chosen as a multiple of the divisor so the cost is always exact.
    quantity = units * 10 ** max(0, p + b - q)

    paid = cost(price, quantity, base_decimals=b, quote_decimals=q, price_decimals=p)

    assert type(paid) is int
    assert paid * 10 ** (p + b) == price * quantity * 10**q


@pytest.mark.parametrize("value", [0, 1, -1, INT64_MAX, INT64_MIN])
def test_checked_int64_accepts_every_signed_64_bit_value(value: int) -> None:
    assert checked_int64(value, "available") == value


@pytest.mark.parametrize("value", [INT64_MAX + 1, INT64_MIN - 1, 2**100])
def test_checked_int64_rejects_values_outside_bigint_as_overflow_naming_the_column(
    value: int,
) -> None:
    with pytest.raises(AmountError) as caught:
        checked_int64(value, "frozen")

    assert caught.value.reason is Reason.OVERFLOW
    assert "frozen" in caught.value.detail


@pytest.mark.parametrize(
    ("raw", "places", "text"),
    [
        (150_000_000, 8, "1.5"),
        (7_500_000_000, 8, "75"),
        (1, 8, "0.00000001"),
        (-1, 8, "-0.00000001"),
        (-150_000_000, 8, "-1.5"),
        (0, 8, "0"),
        (42, 0, "42"),
        (INT64_MAX, 18, "9.223372036854775807"),
        (INT64_MIN, 18, "-9.223372036854775808"),
    ],
)
def test_raw_units_render_as_plain_whole_unit_decimals(raw: int, places: int, text: str) -> None:
    assert to_decimal_string(raw, places) == text


@settings(max_examples=400, deadline=None)
@given(raw=int64, places=decimals)
def test_decimal_string_round_trips_every_int64_at_every_precision(raw: int, places: int) -> None:
    text = to_decimal_string(raw, places)

    assert re.fullmatch(r"-?[0-9]+(\.[0-9]*[1-9])?", text), text
    assert parse_decimal(text, places) == raw


@pytest.mark.parametrize(
    ("text", "places", "raw"),
    [
        ("1.5", 8, 150_000_000),
        ("75", 8, 7_500_000_000),
        ("0.00000001", 8, 1),
        ("-0.00000001", 8, -1),
        ("1.50000000000", 8, 150_000_000),
        (" 2.25 ", 2, 225),
        ("7", 0, 7),
        ("7.000", 0, 7),
    ],
)
def test_parse_decimal_reads_whole_units_into_raw_units(text: str, places: int, raw: int) -> None:
    parsed = parse_decimal(text, places)

    assert parsed == raw
    assert type(parsed) is int


@pytest.mark.parametrize(("text", "places"), [("0.000000001", 8), ("1.5", 0), ("0.125", 2)])
def test_parse_decimal_rejects_more_places_than_the_asset_has_instead_of_rounding(
    text: str, places: int
) -> None:
    with pytest.raises(ValueError, match="decimal places"):
        parse_decimal(text, places)


@pytest.mark.parametrize(
    "text",
    ["", "-", "abc", "1.", ".5", "+1", "1e3", "1,5", "0x10", "1_000", "1.2.3", "NaN", "inf", "- 1"],
)
def test_parse_decimal_rejects_text_that_is_not_a_plain_decimal(text: str) -> None:
    with pytest.raises(ValueError, match="not a decimal number"):
        parse_decimal(text, 8)


@pytest.mark.parametrize("text", ["\u0661", "\uff11", "\u0663.\u0665"])
def test_parse_decimal_rejects_non_ascii_digits(text: str) -> None:
    with pytest.raises(ValueError):
        parse_decimal(text, 8)
