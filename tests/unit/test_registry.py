"""SPEC section 7: the asset registry file, its shipped default, and how a bad one fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from settler.config import DEFAULT_REGISTRY, ConfigError
from settler.core.registry import Asset, Symbol, load_registry

GOOD_REGISTRY = """
fee_account = 77

[[assets]]
id = 10
name = "sol"
decimals = 9

[[assets]]
id = 20
name = "USDC"
decimals = 6

[[symbols]]
name = "SOL_USDC"
base = "SOL"
quote = "usdc"
price_decimals = 3
"""


def registry_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "registry.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("asset_id", "expected"),
    [(1, Asset(1, "BTC", 8)), (2, Asset(2, "USDT", 8)), (3, Asset(3, "ETH", 8))],
)
def test_default_registry_ships_btc_usdt_and_eth_with_8_decimals(
    asset_id: int, expected: Asset
) -> None:
    registry = load_registry(DEFAULT_REGISTRY)

    assert registry.asset(asset_id) == expected


@pytest.mark.parametrize(("name", "base"), [("BTC_USDT", "BTC"), ("ETH_USDT", "ETH")])
def test_default_registry_ships_usdt_symbols_with_price_decimals_2(name: str, base: str) -> None:
    registry = load_registry(DEFAULT_REGISTRY)

    symbol = registry.symbol(name)

    assert symbol is not None
    assert (symbol.base.name, symbol.quote.name, symbol.price_decimals) == (base, "USDT", 2)


def test_default_registry_has_exactly_three_assets_two_symbols_and_a_fee_account() -> None:
    registry = load_registry(DEFAULT_REGISTRY)

    assert set(registry.assets_by_id) == {1, 2, 3}
    assert set(registry.symbols) == {"BTC_USDT", "ETH_USDT"}
    assert registry.fee_account > 0


def test_a_custom_registry_file_is_loaded_with_names_upper_cased(tmp_path: Path) -> None:
    registry = load_registry(registry_file(tmp_path, GOOD_REGISTRY))

    sol, usdc = Asset(10, "SOL", 9), Asset(20, "USDC", 6)
    assert registry.assets_by_id == {10: sol, 20: usdc}
    assert registry.symbols == {"SOL_USDC": Symbol("SOL_USDC", sol, usdc, 3)}
    assert registry.fee_account == 77


def test_assets_are_found_by_name_whatever_the_case() -> None:
    registry = load_registry(DEFAULT_REGISTRY)

    assert registry.asset_named("btc") == registry.asset_named("BTC") == Asset(1, "BTC", 8)


def test_unknown_asset_ids_and_symbols_are_not_found() -> None:
    registry = load_registry(DEFAULT_REGISTRY)

    assert registry.asset(99) is None
    assert registry.asset_named("DOGE") is None
    assert registry.symbol("DOGE_USDT") is None


BAD_REGISTRIES = {
    "duplicate-asset-id": GOOD_REGISTRY.replace("id = 20", "id = 10"),
    "duplicate-asset-name": GOOD_REGISTRY.replace('name = "USDC"', 'name = "Sol"'),
    "symbol-with-unknown-base": GOOD_REGISTRY.replace('base = "SOL"', 'base = "DOGE"'),
    "symbol-with-unknown-quote": GOOD_REGISTRY.replace('quote = "usdc"', 'quote = "USDT"'),
    "decimals-above-18": GOOD_REGISTRY.replace("decimals = 9", "decimals = 19"),
    "negative-decimals": GOOD_REGISTRY.replace("decimals = 9", "decimals = -1"),
    "fractional-decimals": GOOD_REGISTRY.replace("decimals = 9", "decimals = 8.5"),
    "string-decimals": GOOD_REGISTRY.replace("decimals = 9", 'decimals = "9"'),
    "price-decimals-above-18": GOOD_REGISTRY.replace("price_decimals = 3", "price_decimals = 19"),
    "asset-id-zero": GOOD_REGISTRY.replace("id = 10", "id = 0"),
    "asset-id-above-cql-int": GOOD_REGISTRY.replace("id = 10", "id = 2147483648"),
    "fee-account-zero": GOOD_REGISTRY.replace("fee_account = 77", "fee_account = 0"),
    "no-fee-account": GOOD_REGISTRY.replace("fee_account = 77", ""),
    "duplicate-symbol": GOOD_REGISTRY
    + '\n[[symbols]]\nname = "SOL_USDC"\nbase = "SOL"\nquote = "USDC"\nprice_decimals = 2\n',
    "unknown-key": GOOD_REGISTRY.replace("decimals = 9", "decimals = 9\nticker = 1"),
    "asset-missing-decimals": GOOD_REGISTRY.replace("decimals = 9", ""),
    "not-toml": "fee_account = \n",
}


@pytest.mark.parametrize("text", BAD_REGISTRIES.values(), ids=BAD_REGISTRIES.keys())
def test_a_bad_registry_is_a_config_error_naming_settler_registry(
    tmp_path: Path, text: str
) -> None:
    path = registry_file(tmp_path, text)

    with pytest.raises(ConfigError, match="SETTLER_REGISTRY"):
        load_registry(path)


def test_a_missing_registry_file_is_a_config_error_naming_settler_registry(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="SETTLER_REGISTRY"):
        load_registry(tmp_path / "absent.toml")


def test_the_config_error_names_the_problem_asset(tmp_path: Path) -> None:
    path = registry_file(tmp_path, BAD_REGISTRIES["decimals-above-18"])

    with pytest.raises(ConfigError, match="'sol'") as caught:
        load_registry(path)

    assert "decimals" in str(caught.value)
