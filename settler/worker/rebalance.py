"""The rebalance rule (ARCHITECTURE.md "Rebalances") and where each assigned partition
starts (ARCHITECTURE.md "A database that loses acknowledged writes").

On revoke (eager: every partition at once) planning stops at once: records fetched before
the revoke are dropped, never planned; in-flight groups drain for at most
`REVOKE_DRAIN_S` and what is settled is committed. If the drain completes, memory equals
the database and the session goes on with the new assignment. If it does not, the
session ends: in-flight work is abandoned with the session's memory, and the next session
(a new epoch) waits out the takeover wait before reading. So a position never settles
while an earlier group of the same memory carrying it may still be unacknowledged.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from settler import kafka, logs, metrics
from settler.timeouts import within
from settler.worker.retry import Stopping

if TYPE_CHECKING:
    from settler.worker.session import WriterSession

log = logs.get("settler.worker")

REVOKE_DRAIN_S: Final = 20.0
"""How long a revoke waits for in-flight groups (below the group's rebalance timeout,
settler.kafka.REBALANCE_TIMEOUT_MS)."""


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """The session's consumer rebalance listener; while either callback runs (`busy`) its
    loop plans nothing: records handed out meanwhile are dropped and re-read."""

    def __init__(self, session: WriterSession) -> None:
        self.session = session
        self.revoking = False
        self.assigning = False
        self.steady = asyncio.Event()  # set when no callback is running
        self.steady.set()

    @property
    def busy(self) -> bool:
        return self.revoking or self.assigning

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        session = self.session
        if session.ended.is_set() or not revoked:
            return
        self.revoking = True
        self.steady.clear()
        session.health.checks["partitions"] = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REVOKE_DRAIN_S
        try:
            await within(max(0.0, deadline - loop.time()), session.idle.wait())
            drained = await session.pipeline.drain(max(0.0, deadline - loop.time()))
        except TimeoutError:
            drained = False
        drained = drained and not session.pipeline.abandoned
        if drained and not session.ended.is_set():
            await session.commit_settled(max(1.0, deadline - loop.time()))
            if session.committer.pending():
                # Its dead letters and offsets may still commit; re-reading the revoked
                # partitions now would publish those dead letters again. A new session's
                # producer settles it first (same transactional id: it completes or aborts
                # the pending transaction before the group's offsets are read).
                log.error("partitions revoked while the commit transaction was still "
                          "running: ending the writer session", partitions=names(revoked))
                session.abandon()
            else:
                log.info("partitions revoked after a complete drain",
                         partitions=names(revoked))
        elif not session.ended.is_set():
            log.error("partitions revoked while work was still in flight: ending the writer "
                      "session (its memory and in-flight work); the next one waits out the "
                      "takeover wait", partitions=names(revoked), drain_s=REVOKE_DRAIN_S)
            session.abandon()
        session.offsets.forget(revoked)
        session.dead_letters.forget(revoked)  # queued dead letters are re-read with their records
        self.revoking = False
        self.steady.set()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Start each partition where both Kafka and the database agree it was settled.

        The group's committed offset says the effects of every record below it were
        acknowledged by the database; a database that lost acknowledged writes (a node
        killed before its periodic commitlog sync, RF=1) no longer has them. The progress
        record of the highest committed offset is written to the same database after
        those effects, so if it survived, they did. Each partition therefore starts at the
        lower of the two (the earliest offset if the database has no record); the events
        in between are planned again (the lineage rule re-applies exactly what is missing),
        their dead letters are not published again, and the group's offset never moves
        back (`Offsets.assigned`).

        aiokafka installs the assignment and fetches from the group's committed offsets
        before this callback returns (it awaits an OffsetFetch per partition here), so the
        loop may be handed records from a position this callback is about to move back.
        Nothing is planned while it runs (`busy`); it ends by seeking EVERY partition to
        its start in one step, which drops whatever was fetched before (the records handed
        out meanwhile were dropped by the loop), so each partition is planned from its
        start and in its order."""
        session = self.session
        self.assigning = True
        self.steady.clear()
        log.info("partitions assigned", partitions=names(assigned))
        recorded = session.committer.progress.committed_high  # confirmed by the database
        starts: dict[TopicPartition, int] = {}
        confirmed: dict[str, int] = {}
        for tp in sorted(assigned):
            stream = f"{tp.topic}:{tp.partition}"
            try:
                starts[tp], both_know = await self._start(tp, recorded.get(stream))
            except Stopping:
                return  # the session is ending: the loop stays paused
            except Exception as exc:  # noqa: BLE001 - aiokafka would log it and go on
                # Not transient (the retrier retries the rest): without a start the
                # partition must not be planned, and a session paused for ever would hold
                # the lease while settling nothing.
                log.error("could not decide where an assigned partition starts: ending "
                          "the writer session", topic=tp.topic, partition=tp.partition,
                          error=repr(exc))
                session.fail(exc)
                return
            if both_know:
                confirmed[stream] = starts[tp]
        for tp, start in starts.items():  # one step: no fetch is handed out in between
            session.kafka.consumer.seek(tp, start)
        # Where this session starts on each partition, even one it never commits (an idle
        # partition must not keep older epochs unresolved for ever).
        session.committer.progress.seed_committed(confirmed)
        session.health.checks["partitions"] = True
        self.assigning = False
        self.steady.set()

    async def _start(self, tp: TopicPartition, recorded: int | None) -> tuple[int, bool]:
        """Where `tp` is planned from: min(group's commit, database's record), or its
        earliest offset when either has none (and whether both had one)."""
        session = self.session
        committed = await self._group_committed(tp)
        if committed is not None and committed < 0:
            committed = None
        session.offsets.assigned(tp, committed)
        if committed is not None:
            session.dead_letters.published_below[tp] = committed
        if committed is not None and recorded is None:
            log.warning("the database has no record of this partition's committed "
                        "offset: re-reading it from its earliest offset",
                        topic=tp.topic, partition=tp.partition, committed=committed)
            metrics.REREAD.labels(tp.topic, tp.partition).inc()
        if committed is None or recorded is None:
            return await self._beginning(tp), False  # earliest, as the reset policy
        if recorded < committed:
            log.warning("the database confirms fewer settled events than the group's "
                        "committed offset: re-reading the difference",
                        topic=tp.topic, partition=tp.partition, committed=committed,
                        confirmed=recorded)
            metrics.REREAD.labels(tp.topic, tp.partition).inc()
        return min(committed, recorded), True

    async def _beginning(self, tp: TopicPartition) -> int:
        session = self.session

        async def attempt() -> int:
            offsets = await within(10.0, session.kafka.consumer.beginning_offsets([tp]))
            return offsets[tp]

        return await session.retrier.run("kafka_connect", attempt, kafka.is_transient)

    async def _group_committed(self, tp: TopicPartition) -> int | None:
        session = self.session

        async def attempt() -> int | None:
            return await within(10.0, session.kafka.consumer.committed(tp))

        return await session.retrier.run("kafka_connect", attempt, kafka.is_transient)


def names(partitions: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}:{tp.partition}" for tp in partitions)
