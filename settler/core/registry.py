"""The asset registry: asset ids, names and decimals, symbols with price decimals, fee account.

Loaded once from TOML; every lookup the settlement rules need goes through `Registry`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import msgspec

from settler.config import ConfigError

INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Asset:
    id: int
    name: str
    decimals: int


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    base: Asset
    quote: Asset
    price_decimals: int


class _AssetDoc(msgspec.Struct, forbid_unknown_fields=True):
    id: int
    name: str
    decimals: int


class _SymbolDoc(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    base: str
    quote: str
    price_decimals: int


class _RegistryDoc(msgspec.Struct, forbid_unknown_fields=True):
    fee_account: int
    assets: list[_AssetDoc]
    symbols: list[_SymbolDoc]


@dataclass(frozen=True)
class Registry:
    assets_by_id: dict[int, Asset]
    assets_by_name: dict[str, Asset]
    symbols: dict[str, Symbol]
    fee_account: int

    def asset(self, asset_id: int) -> Asset | None:
        return self.assets_by_id.get(asset_id)

    def asset_named(self, name: str) -> Asset | None:
        return self.assets_by_name.get(name.upper())

    def symbol(self, name: str) -> Symbol | None:
        return self.symbols.get(name)


def load_registry(path: Path) -> Registry:
    """Parse and check a registry file; any problem is a ConfigError naming SETTLER_REGISTRY."""
    try:
        raw = tomllib.loads(path.read_text())
        doc = msgspec.convert(raw, _RegistryDoc)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"SETTLER_REGISTRY: invalid registry {path}: {exc}") from None
    return build_registry(doc, path)


def build_registry(doc: _RegistryDoc, path: Path | str = "<registry>") -> Registry:
    def fail(message: str) -> ConfigError:
        return ConfigError(f"SETTLER_REGISTRY: invalid registry {path}: {message}")

    if not 0 < doc.fee_account <= INT64_MAX:
        raise fail("fee_account must be a positive 64-bit user id")
    by_id: dict[int, Asset] = {}
    by_name: dict[str, Asset] = {}
    for entry in doc.assets:
        if not 0 < entry.id <= 2**31 - 1:
            raise fail(f"asset {entry.name!r}: id must fit a positive CQL int")
        if not 0 <= entry.decimals <= 18:
            raise fail(f"asset {entry.name!r}: decimals must be 0..18")
        if entry.id in by_id or entry.name.upper() in by_name:
            raise fail(f"asset {entry.name!r} (id {entry.id}) is defined twice")
        asset = Asset(entry.id, entry.name.upper(), entry.decimals)
        by_id[asset.id] = asset
        by_name[asset.name] = asset
    symbols: dict[str, Symbol] = {}
    for sym in doc.symbols:
        base, quote = by_name.get(sym.base.upper()), by_name.get(sym.quote.upper())
        if base is None or quote is None:
            raise fail(f"symbol {sym.name!r} names an unknown asset")
        if not 0 <= sym.price_decimals <= 18:
            raise fail(f"symbol {sym.name!r}: price_decimals must be 0..18")
        if sym.name in symbols:
            raise fail(f"symbol {sym.name!r} is defined twice")
        symbols[sym.name] = Symbol(sym.name, base, quote, sym.price_decimals)
    return Registry(by_id, by_name, symbols, doc.fee_account)
