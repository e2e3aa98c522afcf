"""Planning, issuing and landing: Items -> `Ledger.plan` -> groups -> claims, then ONE
LOGGED batch per group -> acknowledged -> `Offsets.settle`.

The rules this module enforces (ARCHITECTURE.md "Why exactly once"):
- Claims before effects: a group's LOGGED batch is sent only once its own claims and those
  of every earlier group are acknowledged (`_land`, the claims chain).
- A batch is re-sent, never re-planned: retries carry the same cells and timestamp.
- Write and settle only while the lease is valid: every attempt checks validity before it
  is sent, and an acknowledgement that arrives after validity lapsed settles nothing.
- The batch bound: groups close at `batch_events` events or `batch_max_bytes` (estimated);
  a batch the database still finds too large is split in two, each part carrying its own
  events' records and rows (at the group's final values), down to one event.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from aiokafka import TopicPartition
from cassandra import InvalidRequest

from settler import logs, metrics
from settler.core.events import Rejected, Trade, kind
from settler.core.ledger import Group, Ledger, Reject, ReplanInFlight, Skip, Write
from settler.core.offsets import Offsets
from settler.core.registry import Registry
from settler.store import batches
from settler.store.batches import (
    BALANCE_RECORD_BYTES,
    LINEAGE_ENTRY_BYTES,
    ROW_BYTES,
    TRADE_RECORD_BYTES,
)
from settler.worker.intake import Item, all_or_none
from settler.worker.ports import Store
from settler.worker.retry import Retrier, Stopping
from settler.worker.tenure import Lapsed, Tenure

log = logs.get("settler.worker")

ROW_ESTIMATE: Final = ROW_BYTES + 2 * LINEAGE_ENTRY_BYTES


class Fatal(Exception):
    """A non-retryable error: the session ends, nothing more is committed, exit 1."""


class BatchTooLarge(Fatal):
    pass


def too_large(exc: BaseException) -> bool:
    return isinstance(exc, InvalidRequest) and "too large" in str(exc).lower()


class Pipeline:
    def __init__(self, *, ledger: Ledger, store: Store, offsets: Offsets[TopicPartition],
                 tenure: Tenure, retrier: Retrier, registry: Registry,
                 dead_letter: Callable[[Item, str, str, str], None],
                 frontier: dict[str, int], ended: asyncio.Event, batch_events: int,
                 batch_max_bytes: int, max_in_flight: int) -> None:
        self.ledger = ledger
        self.store = store
        self.offsets = offsets
        self.tenure = tenure
        self.retrier = retrier
        self.registry = registry
        self.dead_letter = dead_letter
        self.frontier = frontier  # highest offset ever planned, per input partition
        self.ended = ended
        self.batch_events = batch_events
        self.batch_max_bytes = batch_max_bytes
        self.slots = asyncio.Semaphore(max_in_flight)
        self.tasks: set[asyncio.Task[None]] = set()
        self.fatal: BaseException | None = None
        # Some group was given up without its acknowledgement: it may still land (a
        # batchlog replay), so the session is not clean whatever the drain says.
        self.abandoned = False
        self._claims_tail: asyncio.Future[None] | None = None  # claims durable up to here
        self._group_bytes = 0
        self._group_rows = 0
        self._produced_ms: list[int] = []  # Kafka timestamps of the open group's records

    # -- planning ----------------------------------------------------------------------------

    async def settle(self, items: list[Item], pause: Callable[[], bool]) -> None:
        """Plan the items in order, issuing each group as it fills. `pause()` true: stop
        planning (a rebalance or the session's end); what is planned is still issued."""
        ledger = self.ledger
        for item in items:
            if pause():
                break
            self._plan(item)
            group = ledger.group
            if len(group) >= self.batch_events or self._group_bytes >= self.batch_max_bytes:
                await self.issue()
        if len(ledger.group):
            await self.issue()
        ledger.trim()
        metrics.CACHE_ROWS.set(ledger.cached_rows)
        metrics.CACHE_IDS.set(ledger.remembered_ids)

    def _plan(self, item: Item) -> None:
        """Skip or dead-letter the item now, or add it to the open group."""
        if isinstance(item.event, Rejected):
            self.dead_letter(item, "unknown", item.event.reason, item.event.detail)
            return
        try:
            plan = self.ledger.plan(item.event, item.effect, item.position)
        except ReplanInFlight as exc:
            raise Fatal(str(exc)) from exc
        if isinstance(plan, Skip):
            metrics.event(kind(item.event), plan.outcome)
            self.offsets.settle(item.tp, item.record.offset)
        elif isinstance(plan, Reject):
            self.dead_letter(item, kind(item.event), plan.reason, plan.detail)
        else:
            record = TRADE_RECORD_BYTES if isinstance(plan.event, Trade) else (
                BALANCE_RECORD_BYTES)
            rows = len(self.ledger.group.touched)
            self._group_bytes += record + len(plan.claim.source) + (
                rows - self._group_rows) * ROW_ESTIMATE
            self._group_rows = rows
            self._produced_ms.append(item.record.timestamp)

    # -- issuing -----------------------------------------------------------------------------

    async def issue(self) -> None:
        """Send the open group: its claims at once, its LOGGED batch after the claims chain."""
        group = self.ledger.seal()
        produced_ms, self._produced_ms = self._produced_ms, []
        self._group_bytes = self._group_rows = 0
        await self._slot()
        try:
            timestamp = await self.tenure.timestamp()
        except BaseException:
            self.slots.release()
            raise
        claims = batches.claims_batch(group.writes, self._advance_frontier(group),
                                         timestamp=timestamp)
        claimed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        after, self._claims_tail = self._claims_tail, claimed
        self._spawn(self._land(group, produced_ms, claims, timestamp, after, claimed))

    def _advance_frontier(self, group: Group) -> dict[str, int]:
        """The frontier records this group's claims carry: per input partition, the
        highest offset any writer ever planned (never lowered: a re-read after a crash
        plans below what the crashed writer planned)."""
        changed: dict[str, int] = {}
        frontier = self.frontier
        for write in group.writes:
            stream, offset = write.position.stream, write.position.offset
            if offset > frontier.get(stream, -1):
                frontier[stream] = changed[stream] = offset
        return changed

    async def _slot(self) -> None:
        """Wait for room in the pipeline (backpressure), or stop."""
        if not self.slots.locked():
            await self.slots.acquire()
            return
        waiting = asyncio.ensure_future(self.slots.acquire())
        ended = asyncio.ensure_future(self.ended.wait())
        await asyncio.wait({waiting, ended}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        if not waiting.done():
            waiting.cancel()
            raise Stopping
        if self.ended.is_set():
            self.slots.release()
            raise Stopping

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        metrics.IN_FLIGHT.set(len(self.tasks))
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.slots.release()
        metrics.IN_FLIGHT.set(len(self.tasks))

    # -- landing -----------------------------------------------------------------------------

    async def _send(self, statement: Any) -> None:
        if not self.tenure.valid:
            raise Stopping  # never write without a valid lease; the next writer re-reads
        await self.store.run(statement)

    async def _land(self, group: Group, produced_ms: list[int], claims: Any, timestamp: int,
                    after: asyncio.Future[None] | None, claimed: asyncio.Future[None]) -> None:
        """Make the group's claims durable, wait until every earlier group's claims are
        too, then execute its batch until it is durable; settle its events only if the
        lease was still valid when the acknowledgement came."""
        started = time.perf_counter()
        try:
            await self.retrier.run("cql_write", lambda: self._send(claims))
            if after is not None:
                await after
            claimed.set_result(None)
            await self._send_part(group, group.writes, timestamp, whole=True)
        except (Stopping, Lapsed, asyncio.CancelledError):
            self.abandoned = True  # the next session re-reads these events
            return
        except Exception as exc:  # noqa: BLE001 - not transient: a bug, the session must end
            self._fail(exc, group)
            return
        finally:
            if not claimed.done():
                claimed.cancel()  # later groups must not go ahead of a missing claim
        if not self.tenure.valid:
            # Acknowledged too late: another writer may have read the rows before.
            self.abandoned = True
            return
        self._landed(group, produced_ms, started)

    async def _send_part(self, group: Group, writes: Sequence[Write], timestamp: int, *,
                         whole: bool = False) -> None:
        images = group.images if whole else group.images_for(writes)
        batch = batches.settlement_batch(images, writes,
                                            fee_account=self.registry.fee_account,
                                            timestamp=timestamp)
        try:
            await self.retrier.run("cql_write", lambda: self._send(batch))
        except InvalidRequest as exc:
            if not too_large(exc):
                raise
            if len(writes) == 1:
                raise BatchTooLarge(
                    f"one event alone is a batch too large for the database ({exc}): raise "
                    "batch_size_fail_threshold (Cassandra) or check the event") from exc
            metrics.BATCH_SPLITS.inc()
            half = len(writes) // 2
            log.warning("batch too large for the database, split in two and re-sent",
                        events=len(writes), error=str(exc))
            await all_or_none([self._send_part(group, writes[:half], timestamp),
                               self._send_part(group, writes[half:], timestamp)])

    def _fail(self, exc: BaseException, group: Group) -> None:
        if self.fatal is None:
            self.fatal = exc
        metrics.error("batch_too_large" if isinstance(exc, BatchTooLarge) else "cql_write")
        first = group.writes[0].position if group.writes else None
        log.error("settlement batch rejected", error=repr(exc), first_event=str(first))
        self.ended.set()

    def _landed(self, group: Group, produced_ms: list[int], started: float) -> None:
        self.ledger.landed(group)
        now = time.time()
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        offsets, observe, registry = self.offsets, metrics.SETTLE_LATENCY.observe, self.registry
        tp_of: dict[tuple[str, int], TopicPartition] = {}
        outcomes: Counter[tuple[str, str]] = Counter()
        for write, produced in zip(group.writes, produced_ms, strict=True):
            topic, partition, offset = write.position
            tp = tp_of.get((topic, partition))
            if tp is None:
                tp = tp_of[(topic, partition)] = TopicPartition(topic, partition)
            offsets.settle(tp, offset)
            observe(max(0.0, now - produced / 1000))  # from the record's produce time
            outcomes[(kind(write.event), write.outcome)] += 1
            if write.negative_rows:
                _anomalies(write, registry)
        for (event_kind, outcome), count in outcomes.items():
            metrics.event(event_kind, outcome, count=count)
        if group.writes:
            metrics.settled_at(group.writes[-1].event.time)

    async def drain(self, timeout: float) -> bool:
        """Wait for in-flight groups; True if none is left."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)
        return not self.tasks

    def abandon(self) -> None:
        for task in list(self.tasks):
            task.cancel()


def _anomalies(write: Write, registry: Registry) -> None:
    """Rows left below zero: applied anyway (the engine is the authority on funds),
    counted per asset and logged once per event."""
    names = []
    for _, asset_id in write.negative_rows:
        asset = registry.asset(asset_id)
        names.append(asset.name if asset else str(asset_id))
        metrics.anomaly(names[-1])
    position = write.position
    log.warning("balance below zero after settlement",
                rows=[f"{user}:{name}" for (user, _), name in zip(write.negative_rows, names,
                                                                   strict=True)],
                topic=position.topic, partition=position.partition, offset=position.offset,
                event_id=write.event.event_id, type=kind(write.event))
