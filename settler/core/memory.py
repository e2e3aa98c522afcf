"""The single writer's memory: balance rows of recent users and recently settled ids,
bounded by configuration (SETTLER_BALANCE_CACHE_ROWS, SETTLER_RECENT_IDS). Nothing with a
group in flight is evicted: its newest state exists nowhere else yet. No I/O."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice

from settler.core.events import Event, Trade
from settler.core.lineage import Claim, Row
from settler.core.settlement import Effect


@dataclass(slots=True)
class User:
    rows: dict[int, Row]
    pins: int = 0


@dataclass(slots=True)
class Seen:
    digest: bytes
    source: str
    claim: Claim | None  # the claim as read from the database, None if first seen here
    planned: bool = False  # planned in this session: memory includes it everywhere
    pins: int = 0
    recorded: bool = False  # this session made its record durable


class Memory:
    def __init__(self, max_rows: int, max_ids: int) -> None:
        self.max_rows = max_rows
        self.max_ids = max_ids
        self.users: OrderedDict[int, User] = OrderedDict()
        self._rows = 0
        self.seen: dict[bool, OrderedDict[int, Seen]] = {True: OrderedDict(),
                                                         False: OrderedDict()}

    # -- what planning needs loaded ----------------------------------------------------

    def missing_users(self, effects: Iterable[Effect]) -> set[int]:
        users = self.users
        return {user for effect in effects for user, _ in effect.deltas if user not in users}

    def add_user(self, user_id: int, rows: dict[int, Row]) -> None:
        if user_id in self.users:
            return  # what memory has is newer than the database's copy
        self.users[user_id] = User(rows)
        self._rows += max(1, len(rows))

    def unknown_ids(self, events: Iterable[Event]) -> list[tuple[bool, int]]:
        seen = self.seen
        return [
            (is_trade, event_id)
            for event in events
            for is_trade, event_id in [id_of(event)]
            if event_id not in seen[is_trade]
        ]

    def add_claims(self, is_trade: bool, claims: Iterable[Claim]) -> None:
        seen = self.seen[is_trade]
        for claim in claims:
            if claim.event_id not in seen:
                seen[claim.event_id] = Seen(claim.digest, claim.source, claim)

    # -- bounds ----------------------------------------------------------------------------

    def trim(self) -> None:
        """Evict least recently used users and oldest ids beyond the configured bounds,
        never one with a group still in flight (its state exists nowhere else yet)."""
        if self._rows > self.max_rows:
            for user_id in list(islice(self.users, len(self.users) // 4 + 1)):
                user = self.users[user_id]
                if user.pins == 0:
                    del self.users[user_id]
                    self._rows -= max(1, len(user.rows))
                    if self._rows <= self.max_rows:
                        break
        for seen in self.seen.values():
            excess = len(seen) - self.max_ids
            if excess > 0:
                for event_id in list(islice(seen, excess)):
                    if seen[event_id].pins == 0:
                        del seen[event_id]

    @property
    def cached_rows(self) -> int:
        return self._rows

    @property
    def remembered_ids(self) -> int:
        return sum(len(seen) for seen in self.seen.values())

    def row(self, user_id: int, asset_id: int) -> Row | None:
        user = self.users.get(user_id)
        return None if user is None else user.rows.get(asset_id)


def id_of(event: Event) -> tuple[bool, int]:
    if isinstance(event, Trade):
        return True, event.trade_id
    return False, event.event_id
