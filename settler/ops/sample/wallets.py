"""The market generator's own account of every balance row (available, frozen), kept as it
emits each balance event and each trade (whose fill spends exactly what its orders froze),
so that it never publishes a debit a row cannot cover: what makes the stream safe to settle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Final

from settler.ops.sample.book import Book, Order
from settler.ops.sample.records import SampleRecord
from settler.ops.sample.tape import Tape

TAKER_FEE_BPS: Final = 10
MAKER_FEE_BPS: Final = 2

# What each balance event does to (available, frozen), per unit of its amount.
_MOVES = {"deposit": (1, 0), "withdraw": (-1, 0), "freeze": (-1, 1), "unfreeze": (1, -1)}


@dataclass
class Wallets:
    tape: Tape
    fee_account: int
    rows: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    def row(self, user: int, asset: int) -> list[int]:
        return self.rows.setdefault((user, asset), [0, 0])

    def available(self, user: int, asset: int) -> int:
        return self.rows.get((user, asset), [0, 0])[0]

    def _move(self, user: int, asset: int, available: int, frozen: int) -> None:
        """Book one change of a row that a trade makes; it never goes below zero."""
        row = self.row(user, asset)
        row[0] += available
        row[1] += frozen
        assert row[0] >= 0 and row[1] >= 0, (user, asset, row)

    def balance(self, kind: str, user: int, asset: int, amount: int) -> None:
        """Emit one balance event and book it; the generator never lets a row go below 0."""
        row = self.row(user, asset)
        available, frozen = _MOVES[kind]
        row[0] += available * amount
        row[1] += frozen * amount
        assert amount > 0 and row[0] >= 0 and row[1] >= 0, (kind, user, asset, amount, row)
        body = {"type": kind, "event_id": self.tape.ids.next_event(), "user_id": user,
                "asset_id": asset, "amount": amount, "ts": self.tape.tick()}
        self.tape.kinds[kind] += 1
        self.tape.emit(SampleRecord(str(user).encode(), json.dumps(body).encode()))

    def trade(self, book: Book, buy: Order, sell: Order, price: int, quantity: int, *,
              buyer_refund: int, seller_refund: int, taker_side: str) -> None:
        """Emit one fill of `buy` against `sell` and book it: each order's frozen funds go
        down by exactly what the trade takes from them."""
        paid = book.cost(price, quantity)
        buyer_bps, seller_bps = ((TAKER_FEE_BPS, MAKER_FEE_BPS) if taker_side == "buy"
                                 else (MAKER_FEE_BPS, TAKER_FEE_BPS))
        buyer_fee, seller_fee = quantity * buyer_bps // 10_000, paid * seller_bps // 10_000
        base, quote = book.symbol.base.id, book.symbol.quote.id
        for order, spent in ((buy, paid + buyer_refund), (sell, quantity + seller_refund)):
            order.frozen -= spent
            order.remaining -= quantity
            assert order.frozen >= 0 and order.remaining >= 0, order
        moves = (((buy.user, quote), buyer_refund, -(paid + buyer_refund)),
                 ((buy.user, base), quantity - buyer_fee, 0),
                 ((sell.user, base), seller_refund, -(quantity + seller_refund)),
                 ((sell.user, quote), paid - seller_fee, 0),
                 ((self.fee_account, base), buyer_fee, 0),
                 ((self.fee_account, quote), seller_fee, 0))
        for (user, asset), available, frozen in moves:
            if available == 0 and frozen == 0:
                continue  # no fee: settlement does not touch the fee account's row
            self._move(user, asset, available, frozen)
        book.seq += 1
        body = {
            "type": "trade", "trade_id": self.tape.ids.next_trade(),
            "symbol": book.symbol.name, "buy_order_id": buy.order_id,
            "sell_order_id": sell.order_id, "buyer_user_id": buy.user,
            "seller_user_id": sell.user, "base_asset_id": base, "quote_asset_id": quote,
            "price": price, "quantity": quantity, "quote_amount": paid,
            "buyer_refund": buyer_refund, "seller_refund": seller_refund,
            "buyer_fee": buyer_fee, "seller_fee": seller_fee, "match_seq": book.seq,
            "executed_at": self.tape.tick(),
        }
        self.tape.kinds["trade"] += 1
        self.tape.emit(SampleRecord(book.symbol.name.encode(), json.dumps(body).encode()))
