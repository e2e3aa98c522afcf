"""The single writer's memory, and the decision of what each event writes. No I/O here.

`Ledger.plan(event, effect, position)` turns a decoded event at a Kafka position into a
`Plan`: skip it (duplicate), reject it (dead letter), or apply it to the balance rows that
lack it, inside the open group. `Ledger.seal()` closes the group: the final values of the
rows it touched plus the events' records and claims, which become one LOGGED batch
(preceded by the claims). The worker loads what planning needs first (balance rows of the
users involved, claims of ids it does not remember) and tells the ledger when a group is
durable, so nothing it still needs is evicted.

Why this is exactly once (ARCHITECTURE.md "Why exactly once" has the long form): each
writer session has an epoch; its groups are numbered in planning order. A row remembers,
per recent epoch, the group that last wrote it (`lineage`); an id's claim remembers the
epoch and group that planned it and which of its rows it changed then (`rows_applied`).
Memory is cumulative, so a row written by group b of epoch e includes every event that
epoch applied to it in a group <= b. That decides, after any crash, whether a stored row
already includes an event: see `_includes`. Rows are mutated in place while planning and
copied once per sealed group.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from settler.core.amounts import AmountError
from settler.core.events import Event, Reason, Rejected, digest
from settler.core.lineage import (
    Claim,
    Position,
    Resolved,
    Row,
    RowImage,
    includes,
    parse_source,
    row_keys,
)
from settler.core.memory import Memory, Seen, id_of
from settler.core.registry import Registry
from settler.core.settlement import Effect, RowKey, effect_of, moved

__all__ = [  # the Ledger's vocabulary, defined in settler.core.lineage
    "Claim", "Group", "Ledger", "Outcome", "PartlyApplied", "Plan", "Position", "Reject",
    "ReplanInFlight",
    "Resolved", "Row", "RowImage", "Skip", "Write", "parse_source", "row_keys",
]


class ReplanInFlight(AssertionError):
    """An event re-read in the session that planned it, before that plan was durable."""


class PartlyApplied(Exception):
    """An event an earlier writer planned, which may be in some of its rows already, is
    refused on its re-plan (the registry changed since, or an amount now overflows).
    Dead-lettering it would keep its part in those rows: the worker stops instead."""


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


@dataclass(slots=True)
class Write:
    """An event planned into the open group: its record and claim go into the group's
    batches, and `rows` are the rows it changed (the rest already included it)."""

    event: Event
    position: Position
    digest: bytes
    cost: int
    claim: Claim
    rows: tuple[RowKey, ...]
    negative_rows: tuple[RowKey, ...]

    @property
    def outcome(self) -> Outcome:
        # No row to change: the effect was already there; only the record is rewritten.
        return Outcome.SETTLED if self.rows else Outcome.DUPLICATE


Plan = Skip | Reject | Write


@dataclass(slots=True)
class Group:
    """Consecutive planned events that share one write: a row touched by several of them
    is written once, with its final value."""

    epoch: int
    batch: int
    writes: list[Write] = field(default_factory=list)
    touched: dict[RowKey, Row] = field(default_factory=dict)
    users: set[int] = field(default_factory=set)
    images: tuple[RowImage, ...] = ()  # set by `Ledger.seal`

    def __len__(self) -> int:
        return len(self.writes)

    def images_for(self, writes: Iterable[Write]) -> list[RowImage]:
        """The sealed images of the rows these writes changed (for a split batch: each
        part carries its own events' rows, at the group's final values)."""
        wanted = {key for write in writes for key in write.rows}
        return [image for image in self.images if (image.user_id, image.asset_id) in wanted]


class Ledger(Memory):
    """The single writer's planning over its bounded memory (settler.core.memory)."""

    def __init__(self, registry: Registry, max_rows: int, max_ids: int, *, epoch: int = 1,
                 resolved: Resolved | None = None) -> None:
        super().__init__(max_rows, max_ids)
        self.registry = registry
        self.epoch = epoch
        self.resolved = resolved or Resolved()
        self._next_batch = 1
        self.group = Group(epoch, self._next_batch)

    def effect(self, event: Event) -> Effect | Rejected:
        return effect_of(event, self.registry)

    def advance_resolved(self, resolved: Resolved) -> None:
        """`resolved` is durable now: later writes drop lineage of older epochs."""
        self.resolved = resolved

    # -- planning --------------------------------------------------------------------------

    def plan(self, event: Event, effect: Effect | Rejected, position: Position) -> Plan:
        """Decide what `event` at `position` does; a Write is applied to memory and added
        to the open group at once."""
        is_trade, event_id = id_of(event)
        fingerprint = digest(event)
        source = str(position)
        prior = self.seen[is_trade].get(event_id)
        if prior is not None and prior.source != source:
            if prior.digest == fingerprint:
                return Skip(Outcome.DUPLICATE)
            return Reject(
                Reason.CONFLICTING_DUPLICATE,
                f"id {event_id} was settled from {prior.source} with different content",
            )
        if isinstance(effect, Rejected):
            if prior is not None and prior.claim is not None and not prior.recorded and not (
                    self.resolved.covers(prior.claim, position)):
                # Its rows cannot even be named now: any of them may hold it.
                raise PartlyApplied(self._refused(event_id, prior.claim, effect.reason))
            return Reject(effect.reason, effect.detail)
        if prior is not None:
            if prior.recorded:
                return Skip(Outcome.DUPLICATE)  # a re-read of a record this session settled
            if prior.planned:
                # Its first plan is still in flight: a record-only re-plan could land and
                # settle the position while the batch carrying the effect is later lost.
                # The rebalance rule makes this impossible; refuse rather than lose money.
                raise ReplanInFlight(f"{source} re-read while its first plan is in flight")
            if prior.claim is not None and self.resolved.covers(prior.claim, position):
                return Skip(Outcome.DUPLICATE)  # complete before an earlier epoch ended
        keys = sorted(effect.deltas)
        try:
            changed, mask, negative = self._apply(effect, keys, prior)
        except AmountError as exc:
            if prior is not None and any(
                    includes(prior.claim, self.users[user].rows.get(asset), index)
                    for index, (user, asset) in enumerate(keys)):
                raise PartlyApplied(self._refused(event_id, prior.claim, exc.reason)) from exc
            return Reject(exc.reason, exc.detail)
        group = self.group
        if prior is None:
            prior = self.seen[is_trade][event_id] = Seen(fingerprint, source, None)
        # This plan decides the claim: this epoch, this group, the rows it changes.
        prior.planned = True
        prior.claim = Claim(event_id, fingerprint, source, self.epoch, group.batch, mask)
        prior.pins += 1
        write = Write(event, position, fingerprint, effect.cost, prior.claim, tuple(changed),
                      tuple(negative))
        group.writes.append(write)
        return write

    @staticmethod
    def _refused(event_id: int, claim: Claim | None, reason: str) -> str:
        epoch = claim.epoch if claim is not None else "?"
        source = claim.source if claim is not None else "?"
        return (f"event {event_id} at {source}, planned by writer epoch {epoch} and possibly "
                f"in some of its rows already, is refused on its re-plan ({reason}): "
                "dead-lettering it would keep its part in those rows. Restore the registry "
                "it was planned with, or correct the rows, and restart (docs/OPERATIONS.md)")

    def _apply(self, effect: Effect, keys: list[RowKey], prior: Seen | None
               ) -> tuple[list[RowKey], int, list[RowKey]]:
        """Apply the effect to the rows that lack it, in memory: (rows changed, their bits,
        rows left below zero). All or nothing: an overflow on any row leaves every row as
        it was."""
        group, users, time, deltas = self.group, self.users, effect.time, effect.deltas
        todo: list[tuple[RowKey, Row | None, tuple[int, int, int]]] = []
        mask = 0
        for index, key in enumerate(keys):
            user_id, asset_id = key
            row = users[user_id].rows.get(asset_id)
            if prior is not None and includes(prior.claim, row, index):
                continue
            after = moved(0, 0, 0, deltas[key]) if row is None else moved(
                row.available, row.frozen, row.version, deltas[key])
            todo.append((key, row, after))
            mask |= 1 << index
        changed, negative = [], []
        for key, row, (available, frozen, version) in todo:
            user_id, asset_id = key
            user = users[user_id]
            if row is None:
                row = Row(available, frozen, version, time, {})
                if user.rows:
                    self._rows += 1  # a user without rows was already counted as one
                user.rows[asset_id] = row
            else:
                row.available, row.frozen, row.version, row.updated_at = (
                    available, frozen, version, time)
            if key not in group.touched:
                group.touched[key] = row
                if user_id not in group.users:
                    group.users.add(user_id)
                    user.pins += 1
                users.move_to_end(user_id)
            changed.append(key)
            if available < 0 or frozen < 0:
                negative.append(key)
        return changed, mask, negative

    def seal(self) -> Group:
        """Close the open group: copy each touched row's final value (with this group in
        its lineage) and open the next group."""
        group = self.group
        keep_from, epoch, batch = self.resolved.epoch, self.epoch, group.batch
        images = []
        for (user_id, asset_id), row in group.touched.items():
            lineage = row.lineage
            if lineage and min(lineage) < keep_from:
                lineage = row.lineage = {e: b for e, b in lineage.items() if e >= keep_from}
            lineage[epoch] = batch
            images.append(RowImage(user_id, asset_id, row.available, row.frozen, row.version,
                                   row.updated_at, lineage.copy()))
        group.images = tuple(images)
        self._next_batch += 1
        self.group = Group(self.epoch, self._next_batch)
        return group

    def landed(self, group: Group) -> None:
        """The group's batch is durable: its users and ids may be evicted again."""
        for user in group.users:
            self.users[user].pins -= 1
        for write in group.writes:
            is_trade, event_id = id_of(write.event)
            seen = self.seen[is_trade][event_id]
            seen.pins -= 1
            seen.recorded = True
