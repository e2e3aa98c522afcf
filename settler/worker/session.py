"""One writer session: fresh memory, consumer and producer, one epoch of the lease.

The session loop is fetch -> intake (decode, load) -> pipeline (plan, issue, land) ->
committer, until it ends. Why it ends decides what the worker does next (`SessionEnd`).

Rebalances (settler.worker.rebalance) pause the loop; the rebalance rule may end the
session (ABANDONED).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from enum import StrEnum
from typing import Any, Final

from aiokafka import TopicPartition
from aiokafka.errors import ProducerFenced

from settler import logs, metrics
from settler.config import ConnectionSettingError, Settings
from settler.core.ledger import Ledger
from settler.core.offsets import Offsets
from settler.core.registry import Registry
from settler.store.db import Progress
from settler.timeouts import within
from settler.worker.committing import Committer, DeadLetterRefused, ProducerBroken
from settler.worker.dead_letters import DeadLetters
from settler.worker.intake import Intake
from settler.worker.kafka_clients import KafkaClients
from settler.worker.landing import Fatal
from settler.worker.pipeline import Pipeline
from settler.worker.ports import Clients, Store
from settler.worker.rebalance import REVOKE_DRAIN_S, Rebalance
from settler.worker.retry import Backoff, Retrier, Stopping
from settler.worker.tenure import Lapsed, Tenure

log = logs.get("settler.worker")

# SIGTERM budget (inside the 10 s a supervisor usually grants): drain in-flight batches,
# commit, record completeness, close the Kafka clients, release the lease, close the
# database session; each bounded.
DRAIN_TIMEOUT_S: Final = 3.0
CLOSE_TIMEOUT_S: Final = 1.5
RESOLVE_TIMEOUT_S: Final = 1.0
SHUTDOWN_BUDGET_S: Final = DRAIN_TIMEOUT_S + RESOLVE_TIMEOUT_S + 4 * CLOSE_TIMEOUT_S
"""The longest a SIGTERM may take to exit 0 (10 s). Tests and docs refer to this value."""

COMMIT_TIMEOUT_S: Final = 10.0


class SessionEnd(StrEnum):
    """Why a writer session ended; decides what the worker does next."""

    STOPPED = "stopped"  # SIGTERM/SIGINT: drain, commit, exit 0
    LAPSED = "lapsed"  # the lease is not valid (lost, or not renewed in time): standby
    ABANDONED = "abandoned"  # in-flight work dropped (revoke drain, broken producer): new epoch
    FATAL = "fatal"  # a rejected statement or similar bug: exit 1, commit nothing more


class WriterSession:
    def __init__(self, *, settings: Settings, registry: Registry, clients: Clients,
                 store: Store, tenure: Tenure, progress: Progress, health: metrics.Health,
                 stopping: asyncio.Event, batch_max_bytes: int,
                 refused_values: set[tuple[str, int, int]] | None = None) -> None:
        self.settings = settings
        self.tenure = tenure
        self.health = health
        self.stopping = stopping
        self.ended = asyncio.Event()
        self.end: SessionEnd | None = None
        self.clean = False  # drained completely and committed everything settled
        self.idle = asyncio.Event()
        self.idle.set()
        self.kafka = KafkaClients(clients, dlq_topic=settings.dlq_topic, health=health)
        self.ledger = Ledger(registry, settings.balance_cache_rows, settings.recent_ids,
                             epoch=tenure.epoch, resolved=progress.resolved)
        self.offsets: Offsets[TopicPartition] = Offsets()
        self.retrier = Retrier(Backoff(settings.retry_initial_ms / 1000,
                                       settings.retry_max_ms / 1000),
                               ending=self.ended.is_set, wake=self.ended, health=health)
        frontier = dict(progress.frontier)
        self.dead_letters = DeadLetters(
            offsets=self.offsets, replayed_below=dict(progress.committed),
            max_request_bytes=settings.kafka_max_request_bytes,
            refused_values=set() if refused_values is None else refused_values)
        self.committer = Committer(
            producer=self.kafka.producer, consumer=self.kafka.consumer, offsets=self.offsets,
            tenure=tenure, store=store, ledger=self.ledger, progress=progress,
            frontier=frontier, topics=settings.topics, dlq_topic=settings.dlq_topic,
            group_id=settings.group_id, dead_letters=self.dead_letters,
            report=lambda kind, ok: self.retrier.report(kind, ok=ok),
        )
        self.pipeline = Pipeline(
            ledger=self.ledger, store=store, offsets=self.offsets, tenure=tenure,
            retrier=self.retrier, registry=registry, dead_letter=self.dead_letters.dead_letter,
            frontier=frontier, ended=self.ended, batch_events=settings.batch_events,
            batch_max_bytes=batch_max_bytes, max_in_flight=settings.max_in_flight,
        )
        self.intake = Intake(self.kafka.consumer, store, self.ledger, self.offsets, self.retrier,
                             settings.fetch_max_records)
        self.rebalance = Rebalance(self)

    def _end(self, end: SessionEnd) -> None:
        if self.end is None:
            self.end = end
        self.ended.set()

    async def run(self) -> SessionEnd:
        watchers = [
            _when_set(self.stopping, lambda: self._end(SessionEnd.STOPPED)),
            _when_set(self.tenure.lapsed, lambda: self._end(SessionEnd.LAPSED)),
        ]
        try:
            await self.kafka.start(self.retrier, self.settings.topics, self.rebalance)
        except Stopping:
            pass
        except ConnectionSettingError:
            for watcher in watchers:
                watcher.cancel()
            await self.kafka.close(CLOSE_TIMEOUT_S)
            raise  # a refused login: the worker exits 2 naming the setting
        else:
            # A loop stuck on a read (the database frozen) must not hold a SIGTERM up.
            # Cancelling it is safe: reads have no effect, and what it issued drains on its
            # own.
            await _until_set(self.ended, self._loop())
        for watcher in watchers:
            watcher.cancel()
        end = self.end or SessionEnd.STOPPED
        await self._finish(end)
        metrics.SESSIONS.labels(end.value).inc()
        return end

    async def _loop(self) -> None:
        helpers = [asyncio.ensure_future(self._commit_loop()),
                   asyncio.ensure_future(self.kafka.report_lag(self.offsets))]
        try:
            while not self.ended.is_set():
                if self.rebalance.busy:
                    await _first(self.rebalance.steady.wait(), self.ended.wait())
                    continue
                fetched = await self.intake.fetch()
                if not fetched or self.rebalance.busy or self.ended.is_set():
                    continue  # fetched across a rebalance callback: re-read from its start
                self.idle.clear()
                try:
                    items = self.intake.items(fetched)
                    await self.intake.load(items)
                    await self.pipeline.settle(items, pause=self._pause)
                finally:
                    self.idle.set()
        except (Stopping, Lapsed):
            pass
        except Fatal as exc:
            self.pipeline.fatal = self.pipeline.fatal or exc
        finally:
            for helper in helpers:
                helper.cancel()
        if self.pipeline.fatal is not None:
            self._end(SessionEnd.FATAL)

    def _pause(self) -> bool:
        return self.rebalance.busy or self.ended.is_set()

    async def _commit_loop(self) -> None:
        interval = self.settings.commit_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            if self.rebalance.busy:
                continue
            await self.commit_settled(COMMIT_TIMEOUT_S)

    async def _finish(self, end: SessionEnd) -> None:
        if end in (SessionEnd.STOPPED, SessionEnd.ABANDONED):
            # Clean: no group of this session can land later (the lease may be released,
            # or a new session start, without waiting out the takeover wait).
            drained = await self.pipeline.drain(
                DRAIN_TIMEOUT_S if end is SessionEnd.STOPPED else REVOKE_DRAIN_S)
            self.clean = drained and not self.pipeline.abandoned
        if end is SessionEnd.STOPPED:
            await self._commit_quietly(CLOSE_TIMEOUT_S)
            if self.clean:
                with contextlib.suppress(TimeoutError):
                    await within(RESOLVE_TIMEOUT_S, self.committer.progress.resolve_at_clean_end())
        elif end is SessionEnd.FATAL:
            log.error("stopping on a non-retryable error; nothing more is committed",
                      error=repr(self.pipeline.fatal))
        self.pipeline.abandon()  # abandoned groups are re-read from the committed offsets
        await self.kafka.close(CLOSE_TIMEOUT_S)

    async def _commit_quietly(self, timeout: float) -> None:
        try:
            await self.committer.commit(timeout)
        except (ProducerFenced, ProducerBroken, DeadLetterRefused) as exc:
            log.warning("final commit failed; the next writer re-reads from the last one",
                        error=repr(exc))

    def abandon(self) -> None:
        """End the session with its memory and in-flight work (the rebalance rule)."""
        self._end(SessionEnd.ABANDONED)

    def fail(self, exc: BaseException) -> None:
        """End the session on a non-retryable error: exit 1, commit nothing more."""
        self.pipeline.fatal = self.pipeline.fatal or exc
        self._end(SessionEnd.FATAL)

    async def commit_settled(self, timeout: float) -> None:
        """Commit what is settled; a commit that cannot go on ends the session."""
        try:
            await self.committer.commit(timeout)
        except ProducerFenced:
            self._end(SessionEnd.LAPSED)
        except ProducerBroken as exc:
            log.error("the transactional producer failed", error=repr(exc))
            self._end(SessionEnd.ABANDONED)
        except DeadLetterRefused as exc:
            self.fail(exc)



async def _until_set(event: asyncio.Event, work: Coroutine[Any, Any, None]) -> None:
    """Run `work` until it returns or `event` is set, whichever is first."""
    task = asyncio.ensure_future(work)
    ended = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ended.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _when_set(event: asyncio.Event, then: Callable[[], None]) -> asyncio.Task[None]:
    async def watch() -> None:
        await event.wait()
        then()

    return asyncio.ensure_future(watch())


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()

