"""The worker's own write load, planned offline: the settle stream in the order the worker
reads it -> the real `Ledger.plan` -> groups closed as the worker's pipeline closes them (at
`batch_events` events, at the estimated byte bound, at the end of a fetch) -> per group the
UNLOGGED claims batch and the ONE LOGGED settlement batch built by the real `SettlementDb`.

The ceilings execute these batches from memory (the driver ceiling) or from a dump (the
native one), so they carry exactly the cells the worker writes, minus its reads.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cassandra.query import BatchStatement

from benchmarks.stream import Stream
from settler.config import Settings
from settler.core.events import Rejected, Trade, decode
from settler.core.ledger import Ledger, Position, Write
from settler.core.registry import Registry
from settler.ops.sample import SampleRecord
from settler.store import batches
from settler.store.batches import BALANCE_RECORD_BYTES, TRADE_RECORD_BYTES
from settler.worker.main import BATCH_BYTES_SHARE, DEFAULT_BATCH_MAX_BYTES
from settler.worker.pipeline import ROW_ESTIMATE
from settler.worker.ports import ProductionStore


@dataclass
class PlannedGroup:
    """One group of the worker: its claims batch, then its LOGGED batch."""

    claims: BatchStatement
    settlement: BatchStatement
    events: int
    trades: int


@dataclass
class Planned:
    """The groups of each topic of the stream (funding first, then trades)."""

    phases: dict[str, list[PlannedGroup]]
    plan_s: float  # decode, Ledger.plan, seal and both batch builders, over every record
    events: int
    users: int
    batch_events: int
    batch_max_bytes: int
    fetch_records: int

    @property
    def plan_us_per_event(self) -> float:
        return 1e6 * self.plan_s / max(1, self.events)

    @property
    def groups(self) -> int:
        return sum(len(groups) for groups in self.phases.values())


async def batch_bound(store: ProductionStore, settings: Settings) -> int:
    """The byte bound of a group, derived as the worker derives it."""
    if settings.batch_max_bytes is not None:
        return settings.batch_max_bytes
    threshold = await store.batch_fail_threshold()
    return int(threshold * BATCH_BYTES_SHARE) if threshold else DEFAULT_BATCH_MAX_BYTES


def fetch_order(records: Sequence[SampleRecord], positions: Sequence[Position],
                fetch_records: int) -> Iterator[list[tuple[SampleRecord, Position]]]:
    """A topic's records as the worker's fetches bring them while catching up: up to
    `fetch_records` records of one partition at a time, partitions in turn (an
    approximation of aiokafka's getmany over a backlog; the group boundaries it implies
    are the ones that matter)."""
    by_partition: dict[int, list[tuple[SampleRecord, Position]]] = defaultdict(list)
    for record, position in zip(records, positions, strict=True):
        by_partition[position.partition].append((record, position))
    queues = [sorted(items, key=lambda item: item[1].offset)
              for _, items in sorted(by_partition.items())]
    start = 0
    while any(start < len(queue) for queue in queues):
        for queue in queues:
            if start < len(queue):
                yield queue[start:start + fetch_records]
        start += fetch_records


class GroupPlanner:
    """Ledger.plan over records, sealing groups as the worker's pipeline does."""

    def __init__(self, store: ProductionStore, registry: Registry, *, batch_events: int,
                 batch_max_bytes: int) -> None:
        self.store = store
        self.registry = registry
        self.batch_events = batch_events
        self.batch_max_bytes = batch_max_bytes
        # Everything stays in memory (nothing to evict in a benchmark's fresh keyspace).
        self.ledger = Ledger(registry, max_rows=10**9, max_ids=10**9)
        self.frontier: dict[str, int] = {}
        self.timestamp = time.time_ns() // 1000
        self._bytes = 0
        self._rows = 0

    def add_users(self, records: Sequence[SampleRecord]) -> int:
        """Every user of the stream, empty (the keyspace is fresh): no reads while planning."""
        ledger = self.ledger
        effects = []
        for record in records:
            event = decode(record.value)
            assert not isinstance(event, Rejected), event
            effect = ledger.effect(event)
            assert not isinstance(effect, Rejected), effect
            effects.append(effect)
        users = ledger.missing_users(effects)
        for user in users:
            ledger.add_user(user, {})
        return len(users)

    def fetch(self, items: Sequence[tuple[SampleRecord, Position]]) -> list[PlannedGroup]:
        """Plan one fetch; its last group closes with it, as in the worker."""
        ledger = self.ledger
        groups = []
        for record, position in items:
            event = decode(record.value)
            assert not isinstance(event, Rejected), event
            plan = ledger.plan(event, ledger.effect(event), position)
            assert isinstance(plan, Write), (position, plan)
            # The pipeline's estimate: each record, plus each row the group newly touches.
            rows = len(ledger.group.touched)
            self._bytes += (TRADE_RECORD_BYTES if isinstance(event, Trade)
                            else BALANCE_RECORD_BYTES) + len(plan.claim.source)
            self._bytes += (rows - self._rows) * ROW_ESTIMATE
            self._rows = rows
            if len(ledger.group) >= self.batch_events or self._bytes >= self.batch_max_bytes:
                groups.append(self.seal())
        if len(ledger.group):
            groups.append(self.seal())
        return groups

    def seal(self) -> PlannedGroup:
        ledger = self.ledger
        group = ledger.seal()
        self._bytes = self._rows = 0
        self.timestamp += 1  # one explicit write timestamp per group, as the worker's
        changed: dict[str, int] = {}
        for write in group.writes:
            stream, offset = write.position.stream, write.position.offset
            if offset > self.frontier.get(stream, -1):
                self.frontier[stream] = changed[stream] = offset
        # The worker's own batches (settler.store.batches), as the Python driver's
        # BatchStatements: what the driver ceiling executes and the native dump encodes.
        claims = self.store.driver_batch(
            batches.claims_batch(group.writes, changed, timestamp=self.timestamp))
        settlement = self.store.driver_batch(batches.settlement_batch(
            group.images, group.writes, fee_account=self.registry.fee_account,
            timestamp=self.timestamp))
        ledger.landed(group)
        trades = sum(1 for write in group.writes if isinstance(write.event, Trade))
        return PlannedGroup(claims, settlement, len(group.writes), trades)


def plan_stream(store: ProductionStore, registry: Registry, stream: Stream,
                topics: dict[str, tuple[Sequence[SampleRecord], Sequence[Position]]], *,
                batch_events: int, batch_max_bytes: int, fetch_records: int) -> Planned:
    """Each topic's records (in the order given: funding first) into the worker's groups."""
    planner = GroupPlanner(store, registry, batch_events=batch_events,
                           batch_max_bytes=batch_max_bytes)
    users = planner.add_users(stream.records)
    started = time.perf_counter()
    phases: dict[str, list[PlannedGroup]] = {}
    for name, (records, positions) in topics.items():
        phases[name] = [group for fetch in fetch_order(records, positions, fetch_records)
                        for group in planner.fetch(fetch)]
    return Planned(phases, time.perf_counter() - started, stream.events, users,
                   batch_events, batch_max_bytes, fetch_records)
