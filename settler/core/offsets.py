"""Which offsets may be committed: per partition, up to the highest contiguous settled one.

Records are tracked in fetch order and settled in any order (batches land out of order);
`commit_ready()` never passes an offset whose event is not durably settled or
dead-lettered, so a crash can only cause re-reads, never skips; and never returns a
position at or below what the group has committed already (a session that re-reads
from below its group's commit never moves it back).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)


@dataclass
class _Partition:
    pending: deque[int] = field(default_factory=deque)
    settled: set[int] = field(default_factory=set)
    next_commit: int | None = None  # offset to commit (one past the last contiguous settled)
    committed: int | None = None


class Offsets(Generic[P]):
    def __init__(self) -> None:
        self._partitions: dict[P, _Partition] = {}

    def assigned(self, partition: P, committed: int | None) -> None:
        """The partition is ours from the group's `committed` position (None: never
        committed); records may be read again from below it."""
        self._partitions[partition] = _Partition(committed=committed)

    def track(self, partition: P, offset: int) -> None:
        """A record was fetched; offsets of one partition arrive in increasing order."""
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = _Partition()
        if state.pending and offset <= state.pending[-1]:
            raise ValueError(f"offset {offset} of {partition} tracked out of order")
        state.pending.append(offset)

    def settle(self, partition: P, offset: int) -> None:
        """The record's effect is durable (or it is dead-lettered, or a duplicate)."""
        state = self._partitions.get(partition)
        if state is None:
            return  # the partition was revoked meanwhile; its new owner re-reads it
        state.settled.add(offset)
        while state.pending and state.pending[0] in state.settled:
            done = state.pending.popleft()
            state.settled.discard(done)
            state.next_commit = done + 1

    def commit_ready(self) -> dict[P, int]:
        """Positions worth committing now: moved past what was last committed."""
        return {
            partition: state.next_commit
            for partition, state in self._partitions.items()
            if state.next_commit is not None
            and (state.committed is None or state.next_commit > state.committed)
        }

    def confirmed_below_commit(self) -> dict[P, int]:
        """Partitions re-read from below the group's commit: how far their records are
        settled again (never past that commit, which only `commit_ready` moves)."""
        return {
            partition: state.next_commit
            for partition, state in self._partitions.items()
            if state.next_commit is not None and state.committed is not None
            and state.next_commit <= state.committed
        }

    def committed(self, positions: dict[P, int]) -> None:
        for partition, position in positions.items():
            state = self._partitions.get(partition)
            if state is not None:
                state.committed = position

    def forget(self, partitions: Iterable[P]) -> None:
        for partition in partitions:
            self._partitions.pop(partition, None)

    def in_flight(self) -> int:
        return sum(len(state.pending) for state in self._partitions.values())

    def last_committed(self) -> dict[P, int]:
        return {
            partition: state.committed
            for partition, state in self._partitions.items()
            if state.committed is not None
        }
