"""Committing: dead letters and consumer-group offsets go out together, in one Kafka
transaction, and the writer's progress records follow.

The commit rule (ARCHITECTURE.md "Why exactly once", point 6): an offset is committed
only once its event and every earlier event of its partition are durable (settled,
dead-lettered or skipped: `Offsets.commit_ready`), and only while the lease is valid. A
dead letter (settler.worker.dead_letters) is published in the transaction that commits an
offset past it, so a `read_committed` reader sees it exactly once per source record: a
crash before the commit aborts both, and the next writer publishes it again. A replay
(offsets rewound below what was once committed) may publish it again, marked
`settler.ops.replay`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiokafka import TopicPartition
from aiokafka.errors import (
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
)

from settler import logs, metrics
from settler.core.ledger import Ledger
from settler.core.offsets import Offsets
from settler.store.db import Progress
from settler.timeouts import within
from settler.worker.dead_letters import DeadLetters, Letter
from settler.worker.ports import Consumer, Producer, Store
from settler.worker.progress import ProgressRecorder
from settler.worker.tenure import Tenure

log = logs.get("settler.worker")


class ProducerBroken(Exception):
    """The transactional producer cannot go on (a failed abort): the session restarts."""


class DeadLetterRefused(Exception):
    """The dead-letter topic refuses this worker's records (not authorized): nothing more
    can be committed past an invalid record, and no retry fixes it. The worker exits 1."""


class Committer:
    def __init__(self, *, producer: Producer, consumer: Consumer,
                 offsets: Offsets[TopicPartition], tenure: Tenure, store: Store,
                 ledger: Ledger, progress: Progress, frontier: dict[str, int],
                 topics: tuple[str, ...], dlq_topic: str, group_id: str,
                 dead_letters: DeadLetters, report: Callable[[str, bool], None]) -> None:
        self.producer = producer
        self.report = report  # readiness follows the outcome of each commit
        self.consumer = consumer
        self.offsets = offsets
        self.tenure = tenure
        self.dlq_topic = dlq_topic
        self.group_id = group_id
        self.dead_letters = dead_letters
        self._lock = asyncio.Lock()
        self._txn: asyncio.Future[None] | None = None
        self._txn_content: tuple[dict[TopicPartition, int], list[Letter]] = ({}, [])
        self.progress = ProgressRecorder(store=store, tenure=tenure, ledger=ledger,
                                         progress=progress, frontier=frontier, topics=topics)

    def pending(self) -> bool:
        """A commit transaction is still running (not concluded by `commit`)."""
        return self._txn is not None

    # -- the transaction ---------------------------------------------------------------------

    async def commit(self, timeout: float) -> bool:
        """Commit what is ready in one transaction with the dead letters it covers. False
        if nothing was committed now (retried at the next interval). A transaction still
        running after `timeout` is left to finish and accounted for at the next call
        (aborting it blind could abort one Kafka already committed). Raises ProducerFenced
        (another writer) and ProducerBroken (restart the session)."""
        async with self._lock:
            if self._txn is not None and not await self._conclude(timeout):
                return False
            if not self.tenure.valid:
                return False
            reread = self.offsets.confirmed_below_commit()
            if reread:
                # Settled again below the group's commit: the database holds those effects
                # now, so its record of the commit may catch up with Kafka's.
                self.progress.committed_at(reread)
            positions = self.offsets.commit_ready()
            committed = bool(positions) and await self._commit(positions, timeout)
        if committed or reread or self.progress.behind():
            await self.progress.record()
        return committed

    async def _commit(self, positions: dict[TopicPartition, int], timeout: float) -> bool:
        letters = self.dead_letters.below(positions)
        self._txn = asyncio.ensure_future(self._transaction(positions, letters))
        # Concluded by the next call; a session that ends first leaves it to Kafka (the
        # next writer's producer fences it), so its error is looked at here too.
        self._txn.add_done_callback(lambda txn: txn.cancelled() or txn.exception())
        self._txn_content = (positions, letters)
        return await self._conclude(timeout)

    async def _conclude(self, timeout: float) -> bool:
        """Wait for the running transaction; account for it once it ended. True if it
        committed."""
        txn = self._txn
        assert txn is not None
        await asyncio.wait({txn}, timeout=timeout)
        if not txn.done():
            metrics.retry("kafka_commit")
            self.report("kafka_commit", False)
            log.warning("offset commit still running, will check again", timeout_s=timeout)
            return False
        self._txn = None
        positions, letters = self._txn_content
        error = txn.exception()
        if isinstance(error, ProducerFenced | DeadLetterRefused):
            raise error
        if error is not None:
            metrics.retry("kafka_commit")
            self.report("kafka_commit", False)
            log.warning("offset commit failed, will retry", error=repr(error))
            await self._abort()
            if not getattr(error, "retriable", True):
                # A failed record leaves aiokafka's transactional producer out of sequence
                # (the next transaction fails OutOfOrderSequenceNumber): a new session
                # starts with a new one.
                raise ProducerBroken(f"the transactional producer failed: {error!r}")
            return False
        self.report("kafka_commit", True)
        self.dead_letters.published(letters)
        self.offsets.committed(positions)
        self._after_commit(positions)
        return True

    async def _transaction(self, positions: dict[TopicPartition, int],
                           letters: list[Letter]) -> None:
        producer = self.producer
        await producer.begin_transaction()
        sends = [await producer.send(self.dlq_topic, value=letter.value, key=letter.key,
                                     headers=letter.headers) for letter in letters]
        # Every dead letter is acknowledged before the offsets join the transaction: a
        # record the broker refused must not be committed past (aiokafka would commit the
        # transaction anyway).
        results = await asyncio.gather(*sends, return_exceptions=True)
        refused = [(letter, result) for letter, result in zip(letters, results, strict=True)
                   if isinstance(result, BaseException)]
        for letter, error in refused:
            if isinstance(error, MessageSizeTooLargeError | RecordTooLargeError):
                self.dead_letters.value_refused(letter, error)
            elif isinstance(error, TopicAuthorizationFailedError):
                raise DeadLetterRefused(
                    f"the dead-letter topic {self.dlq_topic!r} refuses this worker's records "
                    f"(not authorized: {error!r})")
        if refused:
            raise refused[0][1]  # aborted; sent again (without oversize values) next time
        await producer.send_offsets_to_transaction(positions, self.group_id)
        await producer.commit_transaction()

    async def _abort(self) -> None:
        try:
            await within(10.0, self.producer.abort_transaction())
        except Exception as exc:
            raise ProducerBroken(f"aborting the transaction failed: {exc!r}") from exc

    def _after_commit(self, positions: dict[TopicPartition, int]) -> None:
        self.progress.committed_at(positions)
        for tp, position in positions.items():
            metrics.COMMITTED.labels(tp.topic, tp.partition).set(position)
            highwater = getattr(self.consumer, "highwater", None)
            end = highwater(tp) if highwater is not None else None
            if end is not None:
                metrics.LAG.labels(tp.topic, tp.partition).set(max(0, end - position))
