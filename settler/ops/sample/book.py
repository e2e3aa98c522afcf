"""The market stream's order books: resting limit orders with what is still frozen for
each, and one book per symbol with its mid price, tick and lot (sizes whose cost is always
exact) and the market makers and takers who trade it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from settler.core.amounts import cost
from settler.core.registry import Symbol

# Whole quote units per whole base unit where a market starts; other symbols start at 100.
_START_PRICES: Final = {"BTC_USDT": 60_000, "ETH_USDT": 3_000}


@dataclass
class Order:
    """A resting limit order and what is still frozen for it: quote for a buy, base for a
    sell. Every fill spends exactly its share; a cancel unfreezes the rest."""

    order_id: int
    user: int
    symbol: Symbol
    side: str  # "buy" or "sell"
    price: int
    remaining: int  # base raw units not yet filled
    frozen: int

    @property
    def asset(self) -> int:
        return self.symbol.quote.id if self.side == "buy" else self.symbol.base.id


@dataclass
class Book:
    symbol: Symbol
    mid: int  # raw price
    step: int  # raw price of one basis point of the start price (at least one tick)
    lot: int  # base raw units of one lot; any price times a lot has an exact cost
    makers: list[int]
    takers: list[int]
    buys: list[Order] = field(default_factory=list)
    sells: list[Order] = field(default_factory=list)
    seq: int = 0

    def cost(self, price: int, quantity: int) -> int:
        return cost(price, quantity, base_decimals=self.symbol.base.decimals,
                    quote_decimals=self.symbol.quote.decimals,
                    price_decimals=self.symbol.price_decimals)

    def best(self, side: str, not_of: int | None = None) -> Order | None:
        """The best resting order of `side` that `not_of` does not own (no self-trades)."""
        orders = [o for o in (self.buys if side == "buy" else self.sells) if o.user != not_of]
        if not orders:
            return None
        if side == "buy":
            return max(orders, key=lambda o: (o.price, -o.order_id))
        return min(orders, key=lambda o: (o.price, o.order_id))

    def resting(self, side: str) -> list[Order]:
        return self.buys if side == "buy" else self.sells


def new_book(symbol: Symbol, makers: list[int], takers: list[int]) -> Book:
    price_scale = 10**symbol.price_decimals
    mid = _START_PRICES.get(symbol.name, 100) * price_scale
    lot_exponent = max(0, symbol.price_decimals + symbol.base.decimals - symbol.quote.decimals,
                       symbol.base.decimals - 3)
    return Book(symbol, mid, max(1, mid // 10_000), 10**lot_exponent, makers, takers)
