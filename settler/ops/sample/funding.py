"""How money enters and leaves the market stream: every user's first deposits before it
does anything else (market makers also open their first quotes), top-ups later, and
withdrawals of part of what is available.
"""

from __future__ import annotations

from dataclasses import dataclass

from settler.core.registry import Registry
from settler.ops.sample.tape import Tape
from settler.ops.sample.trading import QUOTES_PER_SIDE, Trading
from settler.ops.sample.wallets import Wallets


@dataclass
class Funding:
    tape: Tape
    wallets: Wallets
    trading: Trading
    registry: Registry
    makers: tuple[int, ...]

    def deposit(self, user: int | None = None) -> bool:
        rng = self.tape.rng
        user = self.tape.user() if user is None else user
        books = self.trading.by_user[user]
        if books:
            book = rng.choice(books)
            if rng.random() < 0.6:
                lots = rng.randint(20, 400) if user in self.makers else rng.randint(5, 80)
                self.wallets.balance("deposit", user, book.symbol.quote.id,
                                     book.cost(book.mid, lots * book.lot))
            else:
                self.wallets.balance("deposit", user, book.symbol.base.id,
                                     rng.randint(5, 200) * book.lot)
            return True
        asset = rng.choice(sorted(self.registry.assets_by_id.values(), key=lambda a: a.id))
        self.wallets.balance("deposit", user, asset.id, rng.randint(1, 500) * 10**asset.decimals)
        return True

    def withdraw(self) -> bool:
        user = self.tape.user()
        funded = sorted(asset for (owner, asset), row in self.wallets.rows.items()
                        if owner == user and row[0] > 0)
        if not funded:
            return False
        asset = self.tape.rng.choice(funded)
        amount = self.wallets.available(user, asset) * self.tape.rng.randint(1, 40) // 100
        self.wallets.balance("withdraw", user, asset, max(1, amount))
        return True

    def fund(self) -> None:
        """Every user's first deposits, before it does anything else; market makers also
        open their first quotes."""
        rng = self.tape.rng
        for user in self.tape.users:
            books = self.trading.by_user[user]
            for asset in sorted({a for b in books for a in (b.symbol.base.id, b.symbol.quote.id)}):
                book = next(b for b in books if asset in (b.symbol.base.id, b.symbol.quote.id))
                lots = rng.randint(400, 1000) if user in self.makers else rng.randint(10, 200)
                # Makers hold about as much base as quote; takers mostly come to buy.
                base_share = 1 if user in self.makers else 4
                amount = (book.cost(book.mid, lots * book.lot) if asset == book.symbol.quote.id
                          else lots * book.lot // base_share)
                self.wallets.balance("deposit", user, asset, amount)
            if not books:
                self.deposit(user)
        for book in self.trading.books:
            for _ in range(2 * QUOTES_PER_SIDE * len(book.makers)):
                self.trading.quote()
