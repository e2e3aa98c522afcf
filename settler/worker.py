"""`settler run`: the long-lived settling worker.

Data flow, one arrow per function: Kafka records -> `decode` -> `Ledger.effect`
(validated) -> `Ledger.plan` (absolute rows) -> `SettlementDb.settlement_batch` (one
LOGGED batch) -> `_land` (retried until durable) -> `Offsets.settle` -> `_commit`.
Only the lease holder consumes; a second worker waits as a standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from cassandra import InvalidRequest

from settler import cql, kafka, logs, metrics
from settler.config import ConfigError, ConnectionSettingError, Settings
from settler.db import SettlementDb, id_bucket
from settler.events import Event, Rejected, decode, kind
from settler.lease import Holder, LeaseLost, WriterLease
from settler.ledger import Ledger, Position, Reject, Skip, Write
from settler.offsets import Offsets
from settler.registry import Registry, load_registry
from settler.settlement import Effect

log = logs.get("settler.worker")

T = TypeVar("T")

PROBE_CQL = "SELECT release_version FROM system.local"
LAG_INTERVAL_S = 5.0

# SIGTERM budget (must end well inside the 10 s a supervisor usually grants):
# drain in-flight batches, commit, then close clients and release the lease.
DRAIN_TIMEOUT_S = 4.0
CLOSE_TIMEOUT_S = 2.0
SHUTDOWN_BUDGET_S = DRAIN_TIMEOUT_S + 3 * CLOSE_TIMEOUT_S
"""The longest a SIGTERM may take to exit 0: drain, then commit, close the clients and
release the lease, each bounded. Tests and docs refer to this one value."""
LOAD_CONCURRENCY = 64
KAFKA_CHECK_TIMEOUT_S = 5.0


class SessionEnd(StrEnum):
    """Why a writer session ended; decides what the worker does next."""

    STOPPED = "stopped"  # SIGTERM/SIGINT: exit 0
    LEASE_LOST = "lease_lost"  # another worker writes now: go back to standby
    FATAL = "fatal"  # a rejected statement or similar bug: exit 1, commit nothing more


class Stopping(Exception):
    """Raised inside waits when the worker is asked to stop."""


class FatalError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Backoff:
    initial_s: float
    max_s: float

    def delays(self) -> Iterable[float]:
        delay = self.initial_s
        while True:
            yield delay * (0.5 + random.random() / 2)
            delay = min(delay * 2, self.max_s)


@dataclass(frozen=True, slots=True)
class Item:
    """One fetched record on its way through the pipeline."""

    tp: TopicPartition
    record: ConsumerRecord
    event: Event | Rejected
    effect: Effect | Rejected


class Worker:
    """Holds the lease (or waits for it) and runs writer sessions until stopped."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.health = metrics.Health()
        self.stopping = asyncio.Event()
        self.backoff = Backoff(settings.retry_initial_ms / 1000, settings.retry_max_ms / 1000)
        metrics.declare_assets(asset.name for asset in registry.assets_by_id.values())

    async def run(self) -> int:
        server = await metrics.serve(
            self.settings.metrics_host, self.settings.metrics_port, self.health
        )
        log.info("worker starting", metrics=f"http://{self.settings.metrics_host}:"
                 f"{self.settings.metrics_port}/metrics", settings=self.settings.redacted())
        try:
            db = await self._retry("cql_connect", lambda: SettlementDb.open(self.settings))
        except Stopping:
            server.close()
            return 0
        except InvalidRequest as exc:
            server.close()
            log.error("the keyspace or its tables are missing: run `settler schema apply`",
                      keyspace=self.settings.keyspace, error=str(exc))
            return 1
        except ConnectionSettingError as exc:
            self._refused("cql", exc)
            server.close()
            raise
        self.health.checks["cql"] = True
        # A refused Kafka login must end a standby too, not only the writer that would
        # meet it when its session starts. One bounded attempt: a broker that is merely
        # down is the writer session's to wait for.
        try:
            await asyncio.wait_for(kafka.check(self.settings), KAFKA_CHECK_TIMEOUT_S)
        except ConnectionSettingError as exc:
            self._refused("kafka", exc)
            await db.close()
            server.close()
            raise
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("Kafka not reachable yet; the writer session retries",
                        error=repr(exc))
        # Readiness follows the database even while idle: without traffic no call would
        # notice it going away, or coming back.
        probe = asyncio.ensure_future(self.health.probe("cql", lambda: db.run(PROBE_CQL)))
        lease = WriterLease(db.session, ttl_s=self.settings.lease_ttl_s)
        code = 0
        try:
            code = await self._lead(db, lease)
        finally:
            probe.cancel()
            try:
                await asyncio.wait_for(lease.release(), CLOSE_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - the lease lapses by itself
                log.warning("could not release the writer lease; a standby takes over when "
                            "it expires", ttl_s=self.settings.lease_ttl_s, error=repr(exc))
            metrics.WRITER.set(0)
            await db.close()
            server.close()
        log.info("worker stopped", exit_code=code)
        return code

    async def _lead(self, db: SettlementDb, lease: WriterLease) -> int:
        last_logged = [0.0]

        def standby(holder: Holder) -> None:
            if time.monotonic() - last_logged[0] > 30:
                last_logged[0] = time.monotonic()
                log.info("standby: another worker holds the writer lease",
                         holder=holder.owner, expires_at_ms=holder.expires_at_ms)

        while not self.stopping.is_set():
            self.health.role = "standby"
            acquiring = asyncio.ensure_future(lease.acquire(standby, on_error=self._cql_down))
            stop_wait = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({acquiring, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            if not acquiring.done():
                acquiring.cancel()
                break
            acquiring.result()
            log.info("writer lease taken", owner=lease.owner, epoch=lease.epoch)
            if lease.took_over_expired and self.settings.takeover_wait_s:
                # A writer that died may have batches in the batchlog that land later. Reading
                # rows before they do, then writing newer cells, could undo them.
                log.info("previous writer died; waiting for its batches to settle",
                         seconds=self.settings.takeover_wait_s)
                await self.sleep(self.settings.takeover_wait_s)
                if self.stopping.is_set():
                    break
            self.health.role = "writer"
            metrics.WRITER.set(1)
            end = await WriterSession(self, db, lease).run()
            metrics.WRITER.set(0)
            self.health.checks["partitions"] = False
            if end is SessionEnd.FATAL:
                return 1
            if end is SessionEnd.LEASE_LOST:
                log.error("writer lease lost to another worker; back to standby")
        return 0

    def _refused(self, check: str, exc: ConnectionSettingError) -> None:
        """Readiness and the log say which setting a server refused; the command then
        exits 2 with the same line."""
        self.health.checks[check] = False
        self.health.error = str(exc)
        log.error("a server refused the settings; exiting without retry",
                  setting=exc.setting, server=exc.server, error=str(exc))

    def _cql_down(self, exc: BaseException) -> None:
        self._health_check("cql", ok=False)
        metrics.retry("cql_lease")
        log.warning("database unavailable, retrying", error=repr(exc))

    async def _retry(self, what: str, attempt: Callable[[], Awaitable[T]],
                     transient: Callable[[BaseException], bool] = cql.is_transient) -> T:
        """Run `attempt` until it succeeds, sleeping with capped exponential backoff on
        transient errors; raises Stopping when the worker is asked to stop."""
        delays = iter(self.backoff.delays())
        while True:
            try:
                result = await attempt()
            except Exception as exc:
                if not transient(exc):
                    raise
                metrics.retry(what)
                self._health_check(what, ok=False)
                log.warning("transient failure, retrying", kind=what, error=repr(exc))
            else:
                self._health_check(what, ok=True)
                return result
            if self.stopping.is_set():
                raise Stopping  # a drain finishes what succeeds at once, abandons the rest
            await self.sleep(next(delays))

    def _health_check(self, what: str, *, ok: bool) -> None:
        """Readiness follows the outcome of the latest database or broker call."""
        check = "cql" if what.startswith("cql") else "kafka"
        self.health.checks[check] = ok

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)


def _kafka_transient(exc: BaseException) -> bool:
    return kafka.is_transient(exc)  # a refused login or certificate is never transient


class WriterSession(ConsumerRebalanceListener):  # type: ignore[misc]
    """One tenure as the single writer: fresh memory, consumer and producer."""

    def __init__(self, worker: Worker, db: SettlementDb, lease: WriterLease) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.db = db
        self.lease = lease
        self.ledger = Ledger(worker.registry, self.settings.balance_cache_rows,
                             self.settings.recent_ids)
        self.offsets: Offsets[TopicPartition] = Offsets()
        self.slots = asyncio.Semaphore(self.settings.max_in_flight)
        self.tasks: set[asyncio.Task[None]] = set()
        self._claims_tail: asyncio.Future[None] | None = None  # claims durable up to here
        self.fatal: BaseException | None = None
        self.consumer: AIOKafkaConsumer = kafka.consumer(self.settings)
        self.producer: AIOKafkaProducer = kafka.producer(self.settings)

    @property
    def health(self) -> metrics.Health:
        return self.worker.health

    def _ending(self) -> SessionEnd | None:
        if self.fatal is not None:
            return SessionEnd.FATAL
        if self.lease.lost.is_set():
            return SessionEnd.LEASE_LOST
        if self.worker.stopping.is_set():
            return SessionEnd.STOPPED
        return None

    async def run(self) -> SessionEnd:
        try:
            await self.worker._retry("kafka_connect", self.consumer.start, _kafka_transient)
            await self.worker._retry("kafka_connect", self.producer.start, _kafka_transient)
        except Stopping:
            await self._close_clients()
            return SessionEnd.STOPPED
        except ConnectionSettingError as exc:
            self.worker._refused("kafka", exc)
            await self._close_clients()
            raise
        self.health.checks["kafka"] = True
        self.consumer.subscribe(list(self.settings.topics), listener=self)
        helpers = [
            asyncio.create_task(self._commit_loop(), name="commit"),
            asyncio.create_task(self.lease.keep(self.worker._cql_down), name="lease"),
            asyncio.create_task(self._lag_loop(), name="lag"),
        ]
        try:
            while (end := self._ending()) is None:
                fetched = await self._fetch()
                if fetched:
                    await self._settle(fetched)
        except Stopping:
            end = self._ending() or SessionEnd.STOPPED
        except LeaseLost:
            end = SessionEnd.LEASE_LOST
        except FatalError:
            end = SessionEnd.FATAL
        for helper in helpers:
            helper.cancel()
        await self._finish(end)
        return end

    async def _finish(self, end: SessionEnd) -> None:
        if end is SessionEnd.FATAL:
            log.error("stopping on a non-retryable error; nothing more is committed",
                      error=repr(self.fatal))
        elif end is SessionEnd.STOPPED:
            await self._drain(DRAIN_TIMEOUT_S)
            await self._commit(timeout=CLOSE_TIMEOUT_S)
        for task in self.tasks:
            task.cancel()  # abandoned batches are re-read from the committed offsets later
        await self._close_clients()

    async def _close_clients(self) -> None:
        async def close(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
            # aiokafka may re-raise the CancelledError of one of its own internal tasks.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(client.stop(), CLOSE_TIMEOUT_S)

        await asyncio.gather(close(self.consumer), close(self.producer))

    # -- rebalance listener -----------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._drain(30.0)
        await self._commit(timeout=5.0)
        self.offsets.forget(revoked)
        self.health.checks["partitions"] = False

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.health.checks["partitions"] = True
        log.info("partitions assigned", partitions=sorted(f"{tp.topic}:{tp.partition}"
                                                          for tp in assigned))

    # -- fetch -> settle -------------------------------------------------------------------

    async def _fetch(self) -> dict[TopicPartition, list[ConsumerRecord]]:
        try:
            fetched: dict[TopicPartition, list[ConsumerRecord]] = await self.consumer.getmany(
                timeout_ms=200, max_records=self.settings.fetch_max_records
            )
        except KafkaError as exc:
            metrics.retry("kafka_fetch")
            log.warning("fetch failed, retrying", error=repr(exc))
            await self.worker.sleep(1.0)
            return {}
        return fetched

    async def _settle(self, fetched: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        items: list[Item] = []
        for tp, records in fetched.items():
            for record in records:
                self.offsets.track(tp, record.offset)
                event = decode(record.value)
                effect = event if isinstance(event, Rejected) else self.ledger.effect(event)
                items.append(Item(tp, record, event, effect))
        await self._load(items)
        group: list[tuple[Item, Write]] = []
        for item in items:
            if self._ending() is not None:
                raise Stopping
            write = await self._plan(item)
            if write is not None:
                group.append((item, write))
                if len(group) >= self.settings.batch_events:
                    await self._issue(group)
                    group = []
        if group:
            await self._issue(group)
        self.ledger.trim()
        metrics.CACHE_ROWS.set(self.ledger.cached_rows)
        metrics.CACHE_IDS.set(self.ledger.remembered_ids)

    async def _plan(self, item: Item) -> Write | None:
        """Skip or dead-letter the item now, or return the rows it writes."""
        if isinstance(item.event, Rejected):
            await self._dead_letter(item, "unknown", item.event.reason, item.event.detail)
            return None
        position = Position(item.tp.topic, item.tp.partition, item.record.offset)
        plan = self.ledger.plan(item.event, item.effect, position)
        if isinstance(plan, Skip):
            metrics.event(kind(item.event), plan.outcome)
            self.offsets.settle(item.tp, item.record.offset)
            return None
        if isinstance(plan, Reject):
            await self._dead_letter(item, kind(item.event), plan.reason, plan.detail)
            return None
        return plan

    async def _load(self, items: list[Item]) -> None:
        """Bring into memory what planning these items needs: balance rows of users not
        cached (one partition read per user) and settled records of ids not remembered
        (one slice query per id bucket)."""
        events = [item.event for item in items if not isinstance(item.event, Rejected)]
        effects = [item.effect for item in items if isinstance(item.effect, Effect)]
        ranges: dict[tuple[bool, int], list[int]] = defaultdict(list)
        for is_trade, event_id in self.ledger.unknown_ids(events):
            ranges[(is_trade, id_bucket(event_id))].append(event_id)
        users = sorted(self.ledger.missing_users(effects))
        gate = asyncio.Semaphore(LOAD_CONCURRENCY)

        async def load_ids(is_trade: bool, bucket: int, ids: list[int]) -> None:
            async with gate:
                records = await self.worker._retry(
                    "cql_read", lambda: self.db.settled(is_trade, bucket, min(ids), max(ids))
                )
            self.ledger.add_settled(is_trade, records)

        async def load_user(user_id: int) -> None:
            async with gate:
                rows = await self.worker._retry("cql_read", lambda: self.db.load_user(user_id))
            self.ledger.add_user(user_id, rows)

        await asyncio.gather(
            *(load_ids(is_trade, bucket, ids) for (is_trade, bucket), ids in ranges.items()),
            *(load_user(user_id) for user_id in users),
        )

    # -- writes ----------------------------------------------------------------------------

    async def _slot(self) -> None:
        """Wait for room in the pipeline (backpressure), or stop."""
        if self.slots.locked():
            waiting = asyncio.ensure_future(self.slots.acquire())
            stop = asyncio.ensure_future(self.worker.stopping.wait())
            lost = asyncio.ensure_future(self.lease.lost.wait())
            await asyncio.wait({waiting, stop, lost}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            lost.cancel()
            if not waiting.done():
                waiting.cancel()
                raise Stopping
            if self._ending() is not None:
                self.slots.release()
                raise Stopping
            return
        await self.slots.acquire()

    async def _timestamp(self) -> int:
        while (ts := self.lease.next_timestamp()) is None:
            if self.lease.lost.is_set():
                raise LeaseLost
            if self.worker.stopping.is_set():
                raise Stopping
            await asyncio.sleep(0.05)  # renewal pending (database slow or down)
        return ts

    async def _issue(self, group: list[tuple[Item, Write]]) -> None:
        """Send consecutive planned events as ONE LOGGED batch (coalescing their hot rows:
        each trade stays inside one atomic batch, a row shared by several is written
        once with its final value), after the claims of their ids."""
        await self._slot()
        try:
            timestamp = await self._timestamp()
        except BaseException:
            self.slots.release()
            raise
        writes = [write for _, write in group]
        claims = self.db.claims_batch(writes, timestamp=timestamp)
        batch = self.db.settlement_batch(
            writes, fee_account=self.worker.registry.fee_account, timestamp=timestamp,
        )
        claimed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        after, self._claims_tail = self._claims_tail, claimed
        self._spawn(self._land(group, claims, batch, after, claimed))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        metrics.IN_FLIGHT.set(len(self.tasks))
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.slots.release()
        metrics.IN_FLIGHT.set(len(self.tasks))

    async def _land(self, group: list[tuple[Item, Write]], claims: Any, batch: Any,
                    after: asyncio.Future[None] | None, claimed: asyncio.Future[None]) -> None:
        """Make the group's id claims durable, wait until every earlier group's claims are
        too, then execute the batch until it is durable.

        The order is what makes the duplicate check sound: a balance row can only carry
        an event's effect (even through a later batch that coalesced it) once that
        event's claim is visible. A retry re-sends identical cells with the same
        timestamp, so it can neither double-apply nor undo a later batch."""
        started = time.perf_counter()

        async def attempt(statement: Any) -> None:
            if self.lease.lost.is_set():
                raise Stopping  # the new writer re-reads these events from the committed offset
            await self.db.run(statement)

        try:
            await self.worker._retry("cql_write", lambda: attempt(claims))
            if after is not None:
                await after
            claimed.set_result(None)
            await self.worker._retry("cql_write", lambda: attempt(batch))
        except Stopping:
            return
        except Exception as exc:  # noqa: BLE001 - not transient: a bug, the session must end
            self.fatal = exc
            metrics.error("cql_write")
            log.error("settlement batch rejected", error=repr(exc), **_where(group[0][0]))
            return
        finally:
            if not claimed.done():
                claimed.cancel()  # later groups must not go ahead of a missing claim
        now = time.time()
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        for item, write in group:
            self.ledger.landed(write)
            self.offsets.settle(item.tp, item.record.offset)
            metrics.SETTLE_LATENCY.observe(max(0.0, now - item.record.timestamp / 1000))
            metrics.event(kind(write.event), write.outcome)
            if write.negative_rows:
                self._anomalies(item, write)
        metrics.settled_at(group[-1][1].event.time)

    def _anomalies(self, item: Item, write: Write) -> None:
        """Rows left below zero: applied anyway (the engine is the authority on funds),
        counted per asset and logged once per event."""
        names = []
        for _, asset_id in write.negative_rows:
            asset = self.worker.registry.asset(asset_id)
            names.append(asset.name if asset else str(asset_id))
            metrics.anomaly(names[-1])
        log.warning("balance below zero after settlement",
                    rows=[f"{user}:{name}" for (user, _), name in zip(write.negative_rows, names,
                                                                       strict=True)],
                    **_where(item))

    async def _dead_letter(self, item: Item, event_kind: str, reason: str, detail: str) -> None:
        await self._slot()
        source = f"{item.tp.topic}/{item.tp.partition}/{item.record.offset}"
        headers = kafka.dead_letter_headers(item.record.headers, reason, source, detail)

        async def send() -> None:
            async def attempt() -> None:
                await self.producer.send_and_wait(
                    self.settings.dlq_topic, value=item.record.value, key=item.record.key,
                    headers=headers,
                )

            try:
                await self.worker._retry("dlq_produce", attempt, _kafka_transient)
            except Stopping:
                return
            self.offsets.settle(item.tp, item.record.offset)
            outcome = "conflict" if reason == "conflicting_duplicate" else "invalid"
            metrics.event(event_kind, outcome, reason)
            log.warning("event dead-lettered", reason=reason, detail=detail, **_where(item))

        self._spawn(send())

    async def _drain(self, timeout: float) -> None:
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)

    # -- offsets -----------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.commit_interval_ms / 1000)
            await self._commit(timeout=10.0)

    async def _lag_loop(self) -> None:
        """Lag against the brokers' end offsets every few seconds, so that it grows while
        settling is stalled (database down) instead of freezing at the last commit."""
        while True:
            await asyncio.sleep(LAG_INTERVAL_S)
            assigned = list(self.consumer.assignment())
            committed = self.offsets.last_committed()
            try:
                ends = await asyncio.wait_for(self.consumer.end_offsets(assigned), 10)
            except (KafkaError, TimeoutError):
                continue
            for tp, end in ends.items():
                if tp in committed:
                    metrics.LAG.labels(tp.topic, tp.partition).set(max(0, end - committed[tp]))

    async def _commit(self, timeout: float) -> None:
        positions = self.offsets.commit_ready()
        if not positions:
            return
        try:
            await asyncio.wait_for(self.consumer.commit(positions), timeout)
        except (KafkaError, TimeoutError) as exc:
            metrics.retry("kafka_commit")
            self.worker._health_check("kafka_commit", ok=False)
            log.warning("offset commit failed, will retry", error=repr(exc))
            return
        self.worker._health_check("kafka_commit", ok=True)
        self.offsets.committed(positions)
        for tp, position in positions.items():
            metrics.COMMITTED.labels(tp.topic, tp.partition).set(position)
            end = self.consumer.highwater(tp)
            if end is not None:
                metrics.LAG.labels(tp.topic, tp.partition).set(max(0, end - position))


def _where(item: Item) -> dict[str, Any]:
    where: dict[str, Any] = {
        "topic": item.tp.topic, "partition": item.tp.partition, "offset": item.record.offset,
    }
    if not isinstance(item.event, Rejected):
        where["event_id"] = item.event.event_id
        where["type"] = kind(item.event)
    return where


def run_worker(settings: Settings) -> int:
    """Entry point of `settler run`: exit code 0 on SIGTERM/SIGINT after draining."""
    logs.configure(settings.log_level, settings.log_format)
    registry = load_registry(settings.registry)
    runner = asyncio.run
    if settings.event_loop in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if settings.event_loop == "uvloop":
                raise ConfigError("SETTLER_EVENT_LOOP: uvloop is not installed") from None
        else:
            runner = uvloop.run

    async def main() -> int:
        worker = Worker(settings, registry)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stopping.set)
        return await worker.run()

    return runner(main())
