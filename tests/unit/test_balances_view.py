"""Balances for people and tools: registry names, exact decimal strings, a readable table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from settler.config import DEFAULT_REGISTRY
from settler.core.amounts import parse_decimal
from settler.core.registry import INT64_MAX, load_registry
from settler.read.balances_view import (
    TABLE_HEADER,
    balances_document,
    balances_table,
    parse_user_id,
    view_one,
    view_rows,
)
from settler.store.db import UserBalance

REGISTRY = load_registry(DEFAULT_REGISTRY)
BTC = REGISTRY.asset_named("BTC")
assert BTC is not None


def row(asset_id: int, available: int, frozen: int) -> UserBalance:
    return UserBalance(1001, asset_id, available, frozen, version=1, updated_at=0)


def test_rows_become_registry_names_and_whole_unit_decimal_strings() -> None:
    views = view_rows([row(1, 150_000_000, 0), row(2, 12_345_678_901, 50_000_000_000)], REGISTRY)

    assert balances_document(1001, views) == {
        "user_id": 1001,
        "balances": [
            {"asset": "BTC", "available": "1.5", "frozen": "0", "total": "1.5"},
            {"asset": "USDT", "available": "123.45678901", "frozen": "500",
             "total": "623.45678901"},
        ],
    }


def test_a_negative_balance_is_shown_not_hidden() -> None:
    (view,) = view_rows([row(3, -5, 200_000_000)], REGISTRY)

    assert (view.available, view.frozen, view.total) == ("-0.00000005", "2", "1.99999995")


def test_an_asset_missing_from_the_registry_is_listed_by_id_in_raw_units() -> None:
    (view,) = view_rows([row(77, 12345, 5)], REGISTRY)

    assert view.as_json() == {"asset": "#77", "available": "12345", "frozen": "5",
                              "total": "12350"}


def test_a_registered_asset_never_held_is_zero() -> None:
    assert view_one(None, BTC).as_json() == {
        "asset": "BTC", "available": "0", "frozen": "0", "total": "0"
    }


def test_table_aligns_amounts_right_under_a_header() -> None:
    views = view_rows([row(1, 150_000_000, 0), row(2, 12_345_678_901, 50_000_000_000)], REGISTRY)

    assert balances_table(views).splitlines() == [
        "ASSET     AVAILABLE  FROZEN         TOTAL",
        "BTC             1.5       0           1.5",
        "USDT   123.45678901     500  623.45678901",
    ]


def test_table_of_no_balances_is_the_header_alone() -> None:
    assert balances_table([]).split() == list(TABLE_HEADER)


@given(available=st.integers(-(2**62), 2**62), frozen=st.integers(0, 2**62))
def test_decimal_strings_parse_back_to_the_exact_raw_amounts(available: int, frozen: int) -> None:
    view = view_one(row(1, available, frozen), BTC)

    assert parse_decimal(view.available, 8) == available
    assert parse_decimal(view.frozen, 8) == frozen
    assert parse_decimal(view.total, 8) == available + frozen


@pytest.mark.parametrize("text", ["1", "1001", str(INT64_MAX)])
def test_user_ids_in_bigint_range_are_accepted(text: str) -> None:
    assert parse_user_id(text) == int(text)


@pytest.mark.parametrize(
    "text", ["", "abc", "1.5", "1_000", " 7", "+7", "0", "-1", str(INT64_MAX + 1), "١٢"]
)
def test_malformed_or_out_of_range_user_ids_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="invalid user id"):
        parse_user_id(text)
