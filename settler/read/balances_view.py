"""Balances as people and tools see them: asset names from the registry, amounts as decimal
strings in whole units (scaled by settler.core.amounts), as a text table or a JSON document.

Pure functions of stored rows and the registry; shared by `settler balances` and the HTTP API
so both always say the same thing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from settler import texttable
from settler.core.amounts import to_decimal_string
from settler.core.registry import INT64_MAX, Asset, Registry
from settler.store.db import UserBalance

TABLE_HEADER: Final = ("ASSET", "AVAILABLE", "FROZEN", "TOTAL")

# ASCII digits only: int() alone would also take "1_000", " 7 " and non-ASCII digits.
_INTEGER: Final = re.compile(r"-?[0-9]{1,100}")


@dataclass(frozen=True, slots=True)
class BalanceView:
    """One asset balance of a user, in whole units as decimal strings."""

    asset: str
    available: str
    frozen: str
    total: str

    def as_json(self) -> dict[str, str]:
        return {
            "asset": self.asset,
            "available": self.available,
            "frozen": self.frozen,
            "total": self.total,
        }


def parse_user_id(text: str) -> int:
    """A user id as typed by a person: a decimal integer 1..2^63-1 (CQL bigint, positive)."""
    if _INTEGER.fullmatch(text) is None:
        raise ValueError(f"invalid user id {text!r}: expected an integer")
    user_id = int(text)
    if not 0 < user_id <= INT64_MAX:
        raise ValueError(f"invalid user id {text!r}: expected 1..{INT64_MAX}")
    return user_id


def unregistered_asset(asset_id: int) -> Asset:
    """A row whose asset id the registry no longer knows is still shown, never hidden: named
    `#<id>` and in raw units (decimals 0), since its scale is unknown."""
    return Asset(asset_id, f"#{asset_id}", 0)


def balance_view(available: int, frozen: int, asset: Asset) -> BalanceView:
    return BalanceView(
        asset=asset.name,
        available=to_decimal_string(available, asset.decimals),
        frozen=to_decimal_string(frozen, asset.decimals),
        total=to_decimal_string(available + frozen, asset.decimals),
    )


def view_rows(rows: Iterable[UserBalance], registry: Registry) -> list[BalanceView]:
    """Stored rows (raw units) -> views, in the stored order (asset id ascending)."""
    return [
        balance_view(
            row.available, row.frozen,
            registry.asset(row.asset_id) or unregistered_asset(row.asset_id),
        )
        for row in rows
    ]


def view_one(row: UserBalance | None, asset: Asset) -> BalanceView:
    """A registered asset the user never held has a balance of zero, not "no balance"."""
    if row is None:
        return balance_view(0, 0, asset)
    return balance_view(row.available, row.frozen, asset)


def balances_document(user_id: int, views: Sequence[BalanceView]) -> dict[str, Any]:
    """The JSON body of `GET /v1/balances` and of `settler balances --json`."""
    return {"user_id": user_id, "balances": [view.as_json() for view in views]}


def balances_table(views: Sequence[BalanceView]) -> str:
    """A plain text table: asset left-aligned, amounts right-aligned; header only if empty."""
    return texttable.render(
        [TABLE_HEADER, *((v.asset, v.available, v.frozen, v.total) for v in views)])
