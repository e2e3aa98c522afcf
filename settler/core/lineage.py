"""What a row and a claim say about which events a row includes (ARCHITECTURE.md "Why
exactly once", facts 1-3): positions, rows with their lineage, claims, resolved epochs,
and the lineage rule itself. Pure data and one pure function."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from settler.core.settlement import Effect, RowKey


class Position(NamedTuple):
    """Where a record sits in Kafka."""

    topic: str
    partition: int
    offset: int

    @property
    def stream(self) -> str:
        """The name of this input partition in progress records ("topic:partition")."""
        return f"{self.topic}:{self.partition}"

    def __str__(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"


def parse_source(source: str) -> Position:
    topic, partition, offset = source.rsplit(":", 2)
    return Position(topic, int(partition), int(offset))


@dataclass(slots=True)
class Row:
    """One balance row in memory (mutable: planning updates it in place).

    `lineage` maps a writer epoch to the group of that epoch that last wrote the row;
    only epochs that may still hold an unfinished event are kept (see `Resolved`)."""

    available: int
    frozen: int
    version: int
    updated_at: int
    lineage: dict[int, int]

    @property
    def is_negative(self) -> bool:
        return self.available < 0 or self.frozen < 0


class Claim(NamedTuple):
    """What id_claims says of one id: the position that owns it, its content digest, and
    the epoch and group that last planned it, with the rows it changed then (a bit per
    row, in the order of `row_keys`)."""

    event_id: int
    digest: bytes
    source: str
    epoch: int
    batch: int
    rows_applied: int


@dataclass(frozen=True, slots=True)
class Resolved:
    """Durable knowledge that old events are complete: every event whose latest claim is
    from an epoch below `epoch`, at a position below `offsets` of its partition, is
    applied to all its rows and recorded. Rows need no lineage for epochs below `epoch`."""

    epoch: int = 0
    offsets: Mapping[str, int] = field(default_factory=dict)

    def covers(self, claim: Claim, position: Position) -> bool:
        return claim.epoch < self.epoch and position.offset < self.offsets.get(
            position.stream, 0)


class RowImage(NamedTuple):
    """A row's values as one sealed group writes them (a copy, safe from later planning)."""

    user_id: int
    asset_id: int
    available: int
    frozen: int
    version: int
    updated_at: int
    lineage: dict[int, int]


def row_keys(effect: Effect) -> list[RowKey]:
    """The rows an event touches, in the order the bits of `rows_applied` refer to."""
    return sorted(effect.deltas)



def includes(claim: Claim | None, row: Row | None, index: int) -> bool:
    """Does the stored `row` include the event of `claim` (its own position)?

    The claim's epoch planned the event into group `claim.batch` and changed exactly
    the rows of `rows_applied`; the others included it when that epoch loaded them.
    A changed row includes it iff that epoch wrote the row in that group or a later
    one (memory is cumulative). A row that epoch never wrote durably is as it was
    loaded then: without the event. Later epochs carried the row as loaded."""
    if claim is None:
        return False  # no claim: no batch ever carried the event
    if not claim.rows_applied & (1 << index):
        return True
    if row is None:
        return False
    batch = row.lineage.get(claim.epoch)
    return batch is not None and batch >= claim.batch
