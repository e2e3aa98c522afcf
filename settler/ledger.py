"""The single writer's memory, and the decision of what each event writes. No I/O here.

`Ledger.plan(event, position)` turns a decoded event at a Kafka position into a `Plan`:
skip it (duplicate), reject it (dead letter), or write these absolute rows plus the
event's record in one batch. The worker loads what planning needs first (balance rows of
the users involved, claims of ids it does not remember) and tells the ledger
when a batch is durable, so nothing it still needs is evicted.

Why this is exactly once (ARCHITECTURE.md has the long form): every balance row carries,
per input partition, the highest offset whose effect it includes; events of a partition
are planned in offset order, so "row includes (partition, offset)" is a comparison.
Re-planning an event at its own position applies it only to rows that lack it. An id
seen before at another position is a duplicate (same digest) or a conflict.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import islice

from settler.amounts import AmountError
from settler.events import Event, Reason, Rejected, Trade, digest
from settler.registry import Registry
from settler.settlement import EMPTY_BALANCE, Balance, Effect, RowKey, apply, effect_of


@dataclass(frozen=True, slots=True)
class Position:
    """Where a record sits in Kafka."""

    topic: str
    partition: int
    offset: int

    @property
    def stream(self) -> str:
        """The key of this partition in each row's `applied` map."""
        return f"{self.topic}:{self.partition}"

    def __str__(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"


@dataclass(frozen=True, slots=True)
class StoredRow:
    """A balance row as the worker needs it: values plus per-partition applied offsets."""

    balance: Balance
    applied: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class SettledRecord:
    """What id_claims knows about one id: the position that owns it and its digest."""

    event_id: int
    digest: bytes
    source: str


@dataclass(frozen=True, slots=True)
class RowWrite:
    user_id: int
    asset_id: int
    balance: Balance
    applied: Mapping[str, int]


class Outcome(StrEnum):
    SETTLED = "settled"
    DUPLICATE = "duplicate"
    INVALID = "invalid"
    CONFLICT = "conflict"


@dataclass(frozen=True, slots=True)
class Skip:
    """Already settled: nothing to write; the offset may move on."""

    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Reject:
    """Can never be settled: dead-letter it with a reason."""

    reason: Reason
    detail: str

    @property
    def outcome(self) -> Outcome:
        return Outcome.CONFLICT if self.reason is Reason.CONFLICTING_DUPLICATE else Outcome.INVALID


@dataclass(frozen=True, slots=True)
class Write:
    """One LOGGED batch: `rows` (absolute values) plus the event's record."""

    event: Event
    position: Position
    rows: tuple[RowWrite, ...]
    digest: bytes
    cost: int
    negative_rows: tuple[RowKey, ...]
    users: frozenset[int]

    @property
    def outcome(self) -> Outcome:
        # No row to change: the effect was already there; only the record is rewritten.
        return Outcome.SETTLED if self.rows else Outcome.DUPLICATE


Plan = Skip | Reject | Write


@dataclass(slots=True)
class _User:
    rows: dict[int, StoredRow]
    pins: int = 0


@dataclass(slots=True)
class _Seen:
    digest: bytes
    source: str
    pins: int = 0
    recorded: bool = False  # this session made its record durable


@dataclass
class Ledger:
    """Balance rows and recently settled ids of the single writer, bounded in size."""

    registry: Registry
    max_rows: int
    max_ids: int
    _users: OrderedDict[int, _User] = field(default_factory=OrderedDict)
    _rows: int = 0
    _seen: dict[bool, OrderedDict[int, _Seen]] = field(
        default_factory=lambda: {True: OrderedDict(), False: OrderedDict()}
    )

    # -- what planning needs loaded --------------------------------------------------------

    def effect(self, event: Event) -> Effect | Rejected:
        return effect_of(event, self.registry)

    def missing_users(self, effects: Iterable[Effect]) -> set[int]:
        return {
            user for effect in effects for user, _ in effect.deltas if user not in self._users
        }

    def add_user(self, user_id: int, rows: dict[int, StoredRow]) -> None:
        if user_id in self._users:
            return  # what memory has is newer than the database's copy
        self._users[user_id] = _User(rows)
        self._rows += max(1, len(rows))

    def unknown_ids(self, events: Iterable[Event]) -> list[tuple[bool, int]]:
        return [
            (is_trade, event_id)
            for event in events
            for is_trade, event_id in [_id_of(event)]
            if event_id not in self._seen[is_trade]
        ]

    def add_settled(self, is_trade: bool, records: Iterable[SettledRecord]) -> None:
        seen = self._seen[is_trade]
        for record in records:
            if record.event_id not in seen:
                seen[record.event_id] = _Seen(record.digest, record.source)

    # -- planning --------------------------------------------------------------------------

    def plan(self, event: Event, effect: Effect | Rejected, position: Position) -> Plan:
        """Decide what `event` at `position` does, and update memory as if it will land."""
        is_trade, event_id = _id_of(event)
        fingerprint = digest(event)
        source = str(position)
        prior = self._seen[is_trade].get(event_id)
        if prior is not None and prior.source != source:
            if prior.digest == fingerprint:
                return Skip(Outcome.DUPLICATE)
            return Reject(
                Reason.CONFLICTING_DUPLICATE,
                f"id {event_id} was settled from {prior.source} with different content",
            )
        if isinstance(effect, Rejected):
            return Reject(effect.reason, effect.detail)
        try:
            rows = self._new_rows(effect, position)
        except AmountError as exc:
            return Reject(exc.reason, exc.detail)
        if not rows and prior is not None and prior.recorded:
            return Skip(Outcome.DUPLICATE)  # a re-read of a record this session settled
        # Otherwise write, even with no row left to change: a crashed writer's later batch
        # may have carried this event's effect while the batch with its record was lost,
        # so the record (and claim) are written again; a replay from old offsets pays that.
        # Commit the new values to memory only now that every row computed cleanly.
        users = frozenset(row.user_id for row in rows)
        for row in rows:
            self._put(row)
        for user in users:
            self._users[user].pins += 1
        seen = self._seen[is_trade].get(event_id)
        if seen is None:
            seen = self._seen[is_trade][event_id] = _Seen(fingerprint, source)
        seen.pins += 1
        return Write(
            event=event,
            position=position,
            rows=tuple(rows),
            digest=fingerprint,
            cost=effect.cost,
            negative_rows=tuple(
                (row.user_id, row.asset_id) for row in rows if row.balance.is_negative
            ),
            users=users,
        )

    def _new_rows(self, effect: Effect, position: Position) -> list[RowWrite]:
        rows: list[RowWrite] = []
        for (user_id, asset_id), delta in effect.deltas.items():
            current = self._users[user_id].rows.get(asset_id)
            applied = current.applied if current else {}
            if applied.get(position.stream, -1) >= position.offset:
                continue  # this row already includes this event
            balance = apply(current.balance if current else EMPTY_BALANCE, delta, effect.time)
            rows.append(
                RowWrite(user_id, asset_id, balance, {**applied, position.stream: position.offset})
            )
        return rows

    def _put(self, row: RowWrite) -> None:
        user = self._users[row.user_id]
        if row.asset_id not in user.rows and user.rows:
            self._rows += 1  # a user without rows was already counted as one
        user.rows[row.asset_id] = StoredRow(row.balance, row.applied)
        self._users.move_to_end(row.user_id)

    def landed(self, write: Write) -> None:
        """The batch of `write` is durable: its users and id may be evicted again."""
        for user in write.users:
            self._users[user].pins -= 1
        is_trade, event_id = _id_of(write.event)
        seen = self._seen[is_trade][event_id]
        seen.pins -= 1
        seen.recorded = True

    # -- bounds ----------------------------------------------------------------------------

    def trim(self) -> None:
        """Evict least recently used users and oldest ids beyond the configured bounds,
        never one with a batch still in flight (its state exists nowhere else yet)."""
        if self._rows > self.max_rows:
            for user_id in list(islice(self._users, len(self._users) // 4 + 1)):
                user = self._users[user_id]
                if user.pins == 0:
                    del self._users[user_id]
                    self._rows -= max(1, len(user.rows))
                    if self._rows <= self.max_rows:
                        break
        for seen in self._seen.values():
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
        return sum(len(seen) for seen in self._seen.values())

    def row(self, user_id: int, asset_id: int) -> StoredRow | None:
        user = self._users.get(user_id)
        return None if user is None else user.rows.get(asset_id)


def _id_of(event: Event) -> tuple[bool, int]:
    if isinstance(event, Trade):
        return True, event.trade_id
    return False, event.event_id
