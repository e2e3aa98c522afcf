"""Planning and issuing: Items -> `Ledger.plan` -> groups -> claims, then ONE LOGGED batch
per group, handed to landing (settler.worker.landing) with its place in the claims chain.

The batch bound is enforced here (ARCHITECTURE.md "The batch bound"): a group closes at
`batch_events` events or when its estimated size reaches `batch_max_bytes`. Backpressure
too: at `max_in_flight` groups in flight, planning waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final

from aiokafka import TopicPartition

from settler import logs, metrics
from settler.core.events import Rejected, Trade, kind
from settler.core.ledger import Group, Ledger, PartlyApplied, Reject, ReplanInFlight, Skip
from settler.core.offsets import Offsets
from settler.core.registry import Registry
from settler.store import batches
from settler.store.batches import (
    BALANCE_RECORD_BYTES,
    LINEAGE_ENTRY_BYTES,
    ROW_BYTES,
    TRADE_RECORD_BYTES,
)
from settler.worker.intake import Item
from settler.worker.landing import Fatal, Landing
from settler.worker.ports import Store
from settler.worker.retry import Retrier, Stopping
from settler.worker.tenure import Tenure

log = logs.get("settler.worker")

ROW_ESTIMATE: Final = ROW_BYTES + 2 * LINEAGE_ENTRY_BYTES


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
        self.landing = Landing(ledger=ledger, store=store, offsets=offsets, tenure=tenure,
                               retrier=retrier, registry=registry, ended=ended)
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
        except (ReplanInFlight, PartlyApplied) as exc:
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
        self._spawn(self.landing.land(group, produced_ms, claims, timestamp, after, claimed))

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

    async def drain(self, timeout: float) -> bool:
        """Wait for in-flight groups; True if none is left."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)
        return not self.tasks

    @property
    def fatal(self) -> BaseException | None:
        return self.landing.fatal

    @fatal.setter
    def fatal(self, exc: BaseException | None) -> None:
        self.landing.fatal = exc

    @property
    def abandoned(self) -> bool:
        return self.landing.abandoned

    def abandon(self) -> None:
        for task in list(self.tasks):
            task.cancel()


