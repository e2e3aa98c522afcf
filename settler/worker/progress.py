"""The writer's progress records (table progress): the highest offsets ever committed, so
that a replay is recognised later, and `Resolved` once every offset planned before this
session is committed past (ARCHITECTURE.md "Resolved epochs")."""

from __future__ import annotations

from typing import Final

from aiokafka import TopicPartition

from settler import logs
from settler.core.ledger import Ledger
from settler.core.lineage import Resolved
from settler.store import batches
from settler.store.db import Progress
from settler.timeouts import within
from settler.worker.ports import Store
from settler.worker.tenure import Tenure

log = logs.get("settler.worker")

PROGRESS_TIMEOUT_S: Final = 5.0


class ProgressRecorder:
    def __init__(self, *, store: Store, tenure: Tenure, ledger: Ledger, progress: Progress,
                 frontier: dict[str, int], topics: tuple[str, ...]) -> None:
        self.store = store
        self.tenure = tenure
        self.ledger = ledger
        self.committed_high = dict(progress.committed)
        # Only partitions of the topics this worker reads can be committed past (a topic
        # dropped from SETTLER_TOPICS would otherwise keep older epochs unresolved).
        self.frontier_at_start = {stream: offset for stream, offset in progress.frontier.items()
                                  if stream.rsplit(":", 1)[0] in topics}
        self.frontier = frontier  # shared with the pipeline: what this session planned
        self.committed: dict[str, int] = {}

    def seed_committed(self, committed: dict[str, int]) -> None:
        """The group's committed offsets when partitions were assigned (an idle partition
        is then known committed past, though this session never commits it)."""
        for stream, offset in committed.items():
            if offset > self.committed.get(stream, -1):
                self.committed[stream] = offset

    def committed_at(self, positions: dict[TopicPartition, int]) -> None:
        for tp, position in positions.items():
            self.committed[f"{tp.topic}:{tp.partition}"] = position

    def behind(self) -> bool:
        """A committed position the database has no record of yet (a write failed)."""
        return any(position > self.committed_high.get(stream, -1)
                   for stream, position in self.committed.items())

    async def record(self) -> None:
        """The highest offsets ever committed (to tell a replay later), and `Resolved` once
        every offset planned before this session is committed past."""
        higher = {stream: position for stream, position in self.committed.items()
                  if position > self.committed_high.get(stream, -1)}
        epoch = self.tenure.epoch
        resolve = self.ledger.resolved.epoch < epoch and all(
            self.committed.get(stream, -1) > offset
            for stream, offset in self.frontier_at_start.items())
        if not higher and not resolve:
            return
        try:
            if higher:
                await self._write_progress("committed", higher)
                self.committed_high.update(higher)
            if resolve:
                await self.resolve(Resolved(epoch, dict(self.committed)))
        except Exception as exc:  # noqa: BLE001 - progress records are retried next commit
            log.warning("progress record not written, will retry", error=repr(exc))

    async def resolve(self, resolved: Resolved) -> None:
        """Make `resolved` durable, then let planning drop lineage of older epochs."""
        await self._write_progress("resolved", dict(resolved.offsets), epoch=resolved.epoch)
        self.ledger.advance_resolved(resolved)
        log.info("events of earlier writer sessions complete", resolved_epoch=resolved.epoch)

    async def resolve_at_clean_end(self) -> None:
        """Everything this session planned is committed: the next epoch needs no lineage of
        this one or older."""
        if all(self.committed.get(stream, -1) > offset
               for stream, offset in {**self.frontier_at_start, **self.frontier}.items()):
            try:
                await self.resolve(Resolved(self.tenure.epoch + 1, dict(self.committed)))
            except Exception as exc:  # noqa: BLE001 - the next session resolves it instead
                log.warning("could not record that this session's events are complete",
                            error=repr(exc))

    async def _write_progress(self, name: str, positions: dict[str, int],
                              epoch: int | None = None) -> None:
        timestamp = await self.tenure.timestamp()
        batch = batches.progress_batch(name, positions, timestamp=timestamp, epoch=epoch)
        await within(PROGRESS_TIMEOUT_S, self.store.run(batch))
