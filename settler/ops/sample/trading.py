"""What users do on the market stream's order books: market makers quote near the mid,
takers fill the best resting order (freezing at their own limit, refunded the price
improvement and the unfilled rest), anyone parks an order far away and cancels it later.
Every order freezes what it may spend first (wallets.py books the fills).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from settler.ops.sample.book import Book, Order, new_book
from settler.ops.sample.tape import Tape
from settler.ops.sample.wallets import Wallets

QUOTES_PER_SIDE: Final = 4  # a market maker's resting orders per side before it re-quotes


@dataclass
class Trading:
    tape: Tape
    wallets: Wallets
    books: list[Book]
    by_user: dict[int, list[Book]]  # the books each user may trade (on its home partition)
    next_order: int
    parked: list[Order] = field(default_factory=list)

    def order(self, user: int, book: Book, side: str, price: int, lots: int) -> Order | None:
        """Place (freeze for) an order of up to `lots` lots that the user can pay for."""
        asset = book.symbol.quote.id if side == "buy" else book.symbol.base.id
        per_lot = book.cost(price, book.lot) if side == "buy" else book.lot
        lots = min(lots, self.wallets.available(user, asset) // per_lot)
        if lots <= 0:
            return None
        self.next_order += 1
        placed = Order(self.next_order, user, book.symbol, side, price, lots * book.lot,
                       lots * per_lot)
        self.wallets.balance("freeze", user, asset, placed.frozen)
        return placed

    def cancel(self, order: Order) -> None:
        for book in self.books:
            for resting in (book.buys, book.sells):
                if order in resting:
                    resting.remove(order)
        if order in self.parked:
            self.parked.remove(order)
        if order.frozen:
            self.wallets.balance("unfreeze", order.user, order.asset, order.frozen)
        order.frozen = order.remaining = 0

    def quote(self) -> bool:
        """A market maker adds a resting order near the mid price (re-quoting its oldest
        order on that side first when it has enough of them)."""
        if not self.books:
            return False
        rng = self.tape.rng
        book = rng.choice(self.books)
        maker = rng.choice(book.makers)
        side = rng.choice(["buy", "sell"])
        resting = book.resting(side)
        own = [o for o in resting if o.user == maker]
        if len(own) >= QUOTES_PER_SIDE:
            self.cancel(own[0])
        offset = rng.randint(1, 10) * book.step
        if side == "buy":
            best_sell = book.best("sell")
            price = book.mid - offset
            if best_sell is not None:
                price = min(price, best_sell.price - book.step)
        else:
            best_buy = book.best("buy")
            price = book.mid + offset
            if best_buy is not None:
                price = max(price, best_buy.price + book.step)
        placed = self.order(maker, book, side, max(price, book.step), rng.randint(5, 40))
        if placed is None:
            return False
        resting.append(placed)
        return True

    def take(self) -> bool:
        """A user sends an immediate-or-cancel order that fills against the best resting
        one: it freezes at its own limit, the trade returns the price improvement and the
        unfilled rest."""
        if not self.books:
            return False
        rng = self.tape.rng
        book = rng.choice(self.books)
        taker = rng.choice(book.takers or book.makers)
        side = rng.choice(["buy", "sell"])
        maker_order = book.best("sell" if side == "buy" else "buy", not_of=taker)
        if maker_order is None:
            return False
        slip = rng.randint(0, 3) * book.step
        limit = maker_order.price + slip if side == "buy" else max(book.step,
                                                                   maker_order.price - slip)
        mine = self.order(taker, book, side, limit, rng.randint(1, 30))
        if mine is None:
            return False
        quantity = min(mine.remaining, maker_order.remaining)
        price = maker_order.price
        buy, sell = (mine, maker_order) if side == "buy" else (maker_order, mine)
        if side == "buy":
            refunds = {"buyer_refund": mine.frozen - book.cost(price, quantity),
                       "seller_refund": 0}
        else:
            refunds = {"buyer_refund": 0, "seller_refund": mine.frozen - quantity}
        self.wallets.trade(book, buy, sell, price, quantity, taker_side=side, **refunds)
        assert mine.frozen == 0
        if maker_order.remaining == 0:
            assert maker_order.frozen == 0
            book.resting(maker_order.side).remove(maker_order)
        drift = rng.choice([-1, 0, 0, 1]) * book.step
        book.mid = max(book.mid + drift, 100 * book.step)
        return True

    def park(self) -> bool:
        """Any user places an order far from the market; it rests until cancelled."""
        rng = self.tape.rng
        user = self.tape.user()
        books = self.by_user[user] or [new_book(s, [], []) for s in self.tape.symbols]
        book = rng.choice(books)
        side = rng.choice(["buy", "sell"])
        price = book.mid // 2 if side == "buy" else book.mid * 2
        placed = self.order(user, book, side, price, rng.randint(1, 20))
        if placed is None:
            return False
        self.parked.append(placed)
        return True

    def unpark(self) -> bool:
        if not self.parked:
            return False
        self.cancel(self.tape.rng.choice(self.parked))
        return True

    def open_orders(self) -> list[Order]:
        """Resting at the end, in order of their ids: their funds stay frozen."""
        resting = [o for book in self.books for o in (*book.buys, *book.sells)] + self.parked
        return sorted(resting, key=lambda o: o.order_id)
