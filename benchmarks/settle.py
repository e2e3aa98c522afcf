"""Settlement throughput: the worker end to end, the Python driver's ceiling for the same
batches, a naive one-record-at-a-time loop, replay of a settled topic, and produce->settled
latency. The native (Java) ceiling is in benchmarks/ceiling.py.

The worker is only ever a black box (`python -m settler run`, SETTLER_* environment, of the
working tree or of a git revision); the ceilings and the naive loop are built here from the
working tree's library pieces (Ledger, SettlementDb), whatever revision the worker runs.
Funding (deposits and freezes) sits on a topic of its own and is settled first, so the
timed trade phase never sees a trade before the freeze that funds it (across partitions it
could, and every such trade would be counted and logged as a balance anomaly).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from aiokafka import TopicPartition
from cassandra.concurrent import execute_concurrent

from benchmarks.plan import Planned, batch_bound, plan_stream
from benchmarks.stack import (
    CpuMeter,
    Offsets,
    Stack,
    WorkerProcess,
    WorkerSource,
    behind,
    cpu_seconds,
    end_offsets,
    metric_sum,
    produce,
    produce_paced,
    progress,
    stop_consumer,
)
from benchmarks.stream import Stream, TradeShape, trade_stream
from settler import kafka
from settler.config import Settings
from settler.core.events import Rejected, decode
from settler.core.ledger import Ledger, Position, Write
from settler.core.registry import Registry, load_registry
from settler.store import batches
from settler.store.db import id_bucket
from settler.worker.ports import ProductionStore

CEILING_IN_FLIGHT = 512


@dataclass
class Throughput:
    """One measured run: how much, how long, and who burnt the CPU meanwhile."""

    name: str
    events: int
    trades: int
    wall_s: float
    cpu: dict[str, float]  # percent of one core over the timed span
    startup_s: float = 0.0  # worker only: process start -> /readyz answers 200
    # CPU (utime+stime) of the settling process per event: for the worker, from /readyz
    # to the end over the events settled meanwhile (its start-up is not per-event cost).
    cpu_us_per_event: float = math.nan
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s

    @property
    def trades_per_s(self) -> float:
        return self.trades / self.wall_s

    @property
    def steady_events_per_s(self) -> float:
        """Events per second once the worker answered ready."""
        return self.events / max(1e-9, self.wall_s - self.startup_s)

    @property
    def db_us_per_event(self) -> float:
        """Cassandra's CPU per event over the timed span."""
        return 1e6 * self.cpu["cassandra"] / 100 * self.wall_s / max(1, self.events)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "events_per_s": self.events_per_s,
                "trades_per_s": self.trades_per_s,
                "steady_events_per_s": self.steady_events_per_s,
                "db_us_per_event": self.db_us_per_event}


@dataclass
class Phases:
    """A run over the funding topic, then over the trades topic."""

    funding: Throughput
    trades: Throughput

    @property
    def events_per_s(self) -> float:
        """The whole stream (funding and trades) over both phases' wall time."""
        return (self.funding.events + self.trades.events) / (
            self.funding.wall_s + self.trades.wall_s)

    def as_json(self) -> dict[str, Any]:
        return {"funding": self.funding.as_json(), "trades": self.trades.as_json(),
                "events_per_s": self.events_per_s}


@dataclass
class Inputs:
    """The settle stream, produced: funding on one topic, trades on another."""

    stream: Stream
    funding_topic: str
    trades_topic: str
    positions: list[Position]  # of every record of the stream, in stream order

    @property
    def topics(self) -> dict[str, tuple[list[Any], list[Position]]]:
        """Each phase's records and their positions: funding, then trades."""
        stream, funding = self.stream, self.stream.funding
        return {"funding": (stream.funding_records, self.positions[:funding]),
                "trades": (stream.trade_records, self.positions[funding:])}


async def prepare(stack: Stack, registry: Registry, trades: int, label: str = "settle"
                  ) -> Inputs:
    shape = TradeShape.scaled(trades)
    stream = trade_stream(registry, shape)
    progress(f"  stream: {stream.description}")
    funding_topic = await stack.topic(f"{label}-funding")
    trades_topic = await stack.topic(f"{label}-trades")
    positions = [
        Position(topic, partition, offset)
        for topic, records in ((funding_topic, stream.funding_records),
                               (trades_topic, stream.trade_records))
        for partition, offset in await produce(stack.bootstrap, topic, records)
    ]
    return Inputs(stream, funding_topic, trades_topic, positions)


# -- the worker, end to end ----------------------------------------------------------------


async def run_worker(stack: Stack, topics: Sequence[str], *, events: int, trades: int,
                     keyspace: str, group: str, name: str,
                     extra_env: Mapping[str, str] | None = None,
                     source: WorkerSource | None = None,
                     on_ready: Callable[[WorkerProcess], Awaitable[None]] | None = None,
                     before_stop: Callable[[], Awaitable[None]] | None = None,
                     timeout_s: float = 1800) -> Throughput:
    """Start `settler run` on topics already holding `events` records it has not committed;
    time it from process start until the group's committed offsets reach the end of every
    partition. `on_ready` runs once the worker answers /readyz (e.g. to attach a profiler),
    `before_stop` once it caught up, before it is stopped."""
    ends = await end_offsets(stack.bootstrap, topics)
    async with Offsets(stack.bootstrap) as offsets:
        worker = WorkerProcess(stack, topics=topics, keyspace=keyspace, group=group,
                               label=name, extra_env=extra_env, source=source)
        meter = CpuMeter(worker.pid)
        meter.start(from_zero=True)
        ready_at: float | None = None
        ready_cpu, done_at_ready = 0.0, 0
        next_report = time.monotonic() + 10
        timeline: list[tuple[float, int]] = []  # (s since start, records committed)
        try:
            while True:
                await asyncio.sleep(0.1)
                worker.check_alive()
                if ready_at is None and await worker.ready():
                    ready_at, ready_cpu = time.monotonic(), cpu_seconds(worker.pid)
                    # Its own count, not committed offsets (they lag by a commit interval):
                    # the events whose CPU is before ready_cpu.
                    done_at_ready = int(metric_sum(await worker.metrics(),
                                                   "settler_events_total"))
                    if on_ready is not None:
                        await on_ready(worker)
                remaining = behind(await offsets.committed(group), ends)
                now = time.monotonic()
                if not timeline or now - worker.started >= timeline[-1][0] + 1:
                    timeline.append((now - worker.started, events - remaining))
                if remaining == 0:
                    break
                if now > worker.started + timeout_s:
                    raise RuntimeError(f"{name}: {remaining} records left after {timeout_s}s")
                if now >= next_report:
                    done = events - remaining
                    progress(f"  {name}: {done:,}/{events:,} committed "
                             f"({done / (now - worker.started):,.0f} events/s so far)")
                    next_report = now + 10
            end_cpu = cpu_seconds(worker.pid)
            cpu = meter.stop()
            samples = await worker.metrics()
            if before_stop is not None:
                await before_stop()
        finally:
            code = worker.stop()
    wall = cpu.pop("wall_s")
    startup = (ready_at or worker.started) - worker.started
    steady_events = events - done_at_ready
    per_event = 1e6 * (end_cpu - ready_cpu) / steady_events if steady_events else math.nan
    result = Throughput(name, events, trades, wall, cpu, startup, per_event, notes={
        "outcomes": {outcome: outcome_count(samples, outcome)
                     for outcome in ("settled", "duplicate", "invalid", "conflict")},
        "exit_code": code, "extra_env": dict(extra_env or {}),
        "worker": source.describe if source else "the working tree",
        "anomalies": metric_sum(samples, "settler_balance_anomalies_total"),
        "retries": metric_sum(samples, "settler_retries_total"),
        "batch_p50_s": histogram_quantile(samples, "settler_batch_seconds", 0.5),
        "batch_p99_s": histogram_quantile(samples, "settler_batch_seconds", 0.99),
        "cpu_startup_s": ready_cpu, "events_before_ready": done_at_ready,
        "log": str(worker.log_path),
        "timeline": timeline,
        "other_processes": meter.top_others,
    })
    progress(f"  {name}: {result.events_per_s:,.0f} events/s, {result.trades_per_s:,.0f} "
             f"trades/s over {wall:.1f}s (start-up {startup:.1f}s); CPU: worker "
             f"{cpu['settler']:.0f}% ({per_event:.0f} µs/event), cassandra "
             f"{cpu['cassandra']:.0f}% ({result.db_us_per_event:.0f} µs/event), kafka "
             f"{cpu['kafka']:.0f}%, other processes {cpu['other']:.0f}%")
    return result


def outcome_count(samples: Mapping[str, float], outcome: str) -> float:
    """settler_events_total summed over types and reasons, for one outcome."""
    label = f'outcome="{outcome}"'
    return metric_sum(samples, "settler_events_total", lambda labels: label in labels)


async def run_worker_phases(stack: Stack, inputs: Inputs, label: str,
                            extra_env: Mapping[str, str] | None = None,
                            source: WorkerSource | None = None,
                            **hooks: Any) -> tuple[Phases, str]:
    """Settle the funding topic, then time the trades topic, in a fresh keyspace (with the
    schema of the worker's revision) and group. Returns the two runs and the keyspace
    (replay reuses it). `hooks` (on_ready, before_stop) apply to the trade phase."""
    keyspace = await stack.keyspace(label, source)
    group = stack.group(label)
    stream = inputs.stream
    funding = await run_worker(stack, [inputs.funding_topic], events=stream.funding, trades=0,
                               keyspace=keyspace, group=group, name=f"{label}-funding",
                               extra_env=extra_env, source=source)
    trades = await run_worker(stack, [inputs.trades_topic], events=stream.trades,
                              trades=stream.trades, keyspace=keyspace, group=group,
                              name=label, extra_env=extra_env, source=source, **hooks)
    return Phases(funding, trades), keyspace


async def run_replay(stack: Stack, inputs: Inputs, keyspace: str,
                     source: WorkerSource | None = None) -> Throughput:
    """Both topics again, already settled into `keyspace`, under a new consumer group."""
    return await run_worker(
        stack, [inputs.funding_topic, inputs.trades_topic],
        events=inputs.stream.events, trades=inputs.stream.trades, keyspace=keyspace,
        group=stack.group("replay"), name="replay", source=source,
    )


# -- the driver ceiling: the worker's batches straight from memory -------------------------


async def plan_inputs(store: ProductionStore, settings: Settings, inputs: Inputs) -> Planned:
    """The worker's groups of the settle stream, with the worker's default bounds."""
    registry = load_registry(settings.registry)
    bound = await batch_bound(store, settings)
    planned = await asyncio.to_thread(
        plan_stream, store, registry, inputs.stream, inputs.topics,
        batch_events=settings.batch_events, batch_max_bytes=bound,
        fetch_records=settings.fetch_max_records)
    progress(f"  planned {inputs.stream.events:,} events into {planned.groups:,} groups "
             f"(<= {planned.batch_events} events, <= {planned.batch_max_bytes:,} estimated "
             f"bytes, fetches of {planned.fetch_records:,}): {planned.plan_us_per_event:.0f} "
             "µs per event for decode + Ledger.plan + seal + both batch builders")
    return planned


async def open_store(settings: Settings) -> ProductionStore:
    """The worker's own SettlementDb (ProductionStore) on a benchmark keyspace."""
    store = await ProductionStore.open(settings)
    assert isinstance(store, ProductionStore)
    return store


async def execute_planned(store: ProductionStore, planned: Planned, in_flight: int
                          ) -> Phases:
    """Execute each group's claims batch and LOGGED batch with `in_flight` outstanding
    through the Python driver's own execute_concurrent (callback chaining on its I/O
    thread; no asyncio in the path), funding phase then trades phase."""

    async def execute(name: str, phase: str) -> Throughput:
        groups = planned.phases[phase]
        batches = [batch for group in groups for batch in (group.claims, group.settlement)]
        events = sum(group.events for group in groups)
        meter = CpuMeter(os.getpid())
        meter.start()
        started = time.process_time()
        landed = await asyncio.to_thread(_execute_all, store, batches, in_flight)
        own = time.process_time() - started
        cpu = meter.stop()
        assert landed == len(batches), (landed, len(batches))
        wall = cpu.pop("wall_s")
        return Throughput(name, events, sum(group.trades for group in groups), wall, cpu,
                          cpu_us_per_event=1e6 * own / events, notes={
            "in_flight": in_flight, "plan_us_per_event": planned.plan_us_per_event,
            "users": planned.users, "groups": len(groups), "batches": len(batches),
            "batch_events": planned.batch_events, "batch_max_bytes": planned.batch_max_bytes,
            "other_processes": meter.top_others,
        })

    funding = await execute("ceiling-funding", "funding")
    trades = await execute("ceiling", "trades")
    progress(f"  ceiling: {trades.trades_per_s:,.0f} trades/s over {trades.wall_s:.1f}s; "
             f"CPU: this process {trades.cpu['settler']:.0f}% "
             f"({trades.cpu_us_per_event:.0f} µs/event), cassandra "
             f"{trades.cpu['cassandra']:.0f}% ({trades.db_us_per_event:.0f} µs/event)")
    return Phases(funding, trades)


def _execute_all(store: ProductionStore, batches: list[Any], in_flight: int) -> int:
    results = execute_concurrent(store.session, ((batch, None) for batch in batches),
                                 concurrency=in_flight, raise_on_first_error=True,
                                 results_generator=True)
    return sum(1 for success, _ in results if success)


# -- the naive loop: one record, one batch, one commit -------------------------------------


class NaiveLoop:
    """Consume one record, load what it needs, plan, await its claims and its batch, commit
    its offset."""

    def __init__(self, store: ProductionStore, registry: Registry, ledger: Ledger) -> None:
        self.store = store
        self.registry = registry
        self.ledger = ledger
        self.last_ts = 0
        self.frontier: dict[str, int] = {}

    async def settle_one(self, record: Any) -> None:
        ledger, store = self.ledger, self.store
        event = decode(record.value)
        assert not isinstance(event, Rejected), event
        effect = ledger.effect(event)
        assert not isinstance(effect, Rejected), effect
        for user in ledger.missing_users([effect]):
            ledger.add_user(user, await store.load_user(user))
        for is_trade, event_id in ledger.unknown_ids([event]):
            bucket = id_bucket(event_id)
            ledger.add_claims(is_trade, await store.claims(is_trade, bucket, event_id,
                                                           event_id))
        position = Position(record.topic, record.partition, record.offset)
        plan = ledger.plan(event, effect, position)
        if isinstance(plan, Write):
            group = ledger.seal()
            self.last_ts = max(time.time_ns() // 1000, self.last_ts + 1)
            self.frontier[position.stream] = position.offset
            await store.run(batches.claims_batch(group.writes,
                                                 {position.stream: position.offset},
                                                 timestamp=self.last_ts))
            await store.run(batches.settlement_batch(
                group.images, group.writes, fee_account=self.registry.fee_account,
                timestamp=self.last_ts))
            ledger.landed(group)
        ledger.trim()

    async def run(self, stack: Stack, topic: str, group: str, events: int, trades: int,
                  name: str) -> Throughput:
        settings = stack.settings(self.store.session.keyspace, topic, group)
        consumer = kafka.consumer(settings)
        await consumer.start()
        meter = CpuMeter(os.getpid())
        started, cpu_started = 0.0, 0.0
        try:
            consumer.subscribe([topic])
            for n in range(events):
                record = await consumer.getone()
                if n == 0:  # the group join before it is start-up, not settling
                    started = time.monotonic()
                    cpu_started = time.process_time()
                    meter.start()
                await self.settle_one(record)
                await consumer.commit({TopicPartition(record.topic, record.partition):
                                       record.offset + 1})
                if n % 1000 == 999:
                    progress(f"  {name}: {n + 1:,}/{events:,} "
                             f"({(n + 1) / (time.monotonic() - started):,.0f} events/s)")
            own = time.process_time() - cpu_started
            cpu = meter.stop()
        finally:
            await stop_consumer(consumer)
        wall = cpu.pop("wall_s")
        return Throughput(name, events, trades, wall, cpu, cpu_us_per_event=1e6 * own / events,
                          notes={"other_processes": meter.top_others})


async def run_naive(stack: Stack, registry: Registry, trades: int) -> Phases:
    """The naive loop over a small stream of the same shape (funding topic, then trades)."""
    inputs = await prepare(stack, registry, trades, label="naive")
    stream = inputs.stream
    settings = stack.settings(await stack.keyspace("naive"))
    store = await open_store(settings)
    try:
        loop = NaiveLoop(store, registry,
                         Ledger(registry, settings.balance_cache_rows, settings.recent_ids))
        group = stack.group("naive")
        funding = await loop.run(stack, inputs.funding_topic, group, stream.funding, 0,
                                 "naive-funding")
        trades_run = await loop.run(stack, inputs.trades_topic, group, stream.trades,
                                    stream.trades, "naive")
    finally:
        await store.close()
    progress(f"  naive: {trades_run.trades_per_s:,.0f} trades/s over {trades_run.wall_s:.1f}s "
             f"(funding {funding.events_per_s:,.0f} events/s)")
    return Phases(funding, trades_run)


# -- latency at a steady rate --------------------------------------------------------------


@dataclass
class Latency:
    rate: float  # records/s asked for
    achieved: float  # records/s produced
    events: int
    trades: int
    duration_s: float
    count: float  # observations in the worker's histogram
    settle_p50_s: float
    settle_p99_s: float
    batch_p50_s: float
    batch_p99_s: float
    anomalies: float
    cpu: dict[str, float]


def histogram_quantile(samples: Mapping[str, float], name: str, q: float) -> float:
    """The q-quantile of a Prometheus histogram, interpolated linearly inside the bucket it
    falls in (as PromQL's histogram_quantile does); inf if it falls above the last bound."""
    buckets: list[tuple[float, float]] = []
    for key, value in samples.items():
        if key.startswith(name + "_bucket{"):
            bound = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(bound), value))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    target = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= target:
            if upper == float("inf"):
                return float("inf")
            share = (target - below) / (cumulative - below) if cumulative > below else 1.0
            return lower + (upper - lower) * share
        lower, below = upper, cumulative
    return float("inf")


async def _until(check: Callable[[], Awaitable[bool]], worker: WorkerProcess, timeout_s: float,
                 what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        worker.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not within {timeout_s}s:\n{worker.tail()}")
        await asyncio.sleep(0.1)


async def run_latency(stack: Stack, registry: Registry, rate: float, duration_s: float,
                      extra_env: Mapping[str, str] | None = None,
                      source: WorkerSource | None = None, label: str = "latency") -> Latency:
    """Produce a fresh stream (funding, then trades) at a steady `rate` records/s into a
    running worker; read p50/p99 off its settle-latency histogram. Each `label` gets its
    own topic, group and keyspace (variants must not see each other's events)."""
    trades = max(100, int(rate * duration_s / 1.11))  # funding is about 11% of a stream
    stream = trade_stream(registry, TradeShape.scaled(trades, seed=11))
    topic = await stack.topic(label)
    group = stack.group(label)
    worker = WorkerProcess(stack, topics=[topic],
                           keyspace=await stack.keyspace(label, source),
                           group=group, label=label, extra_env=extra_env, source=source)
    try:
        await _until(worker.ready, worker, 120, "latency worker ready")
        progress(f"  latency: producing {stream.events:,} records at {rate:,.0f}/s "
                 f"(~{stream.events / rate:.0f}s) into a running worker")
        meter = CpuMeter(worker.pid)
        meter.start()
        achieved = await produce_paced(stack.bootstrap, topic, stream.records, rate)
        cpu = meter.stop()
        ends = await end_offsets(stack.bootstrap, [topic])
        async with Offsets(stack.bootstrap) as offsets:

            async def caught_up() -> bool:
                return behind(await offsets.committed(group), ends) == 0

            await _until(caught_up, worker, 300, "latency worker caught up")
        samples = await worker.metrics()
    finally:
        worker.stop()
    result = Latency(
        rate=rate, achieved=achieved, events=stream.events, trades=stream.trades,
        duration_s=stream.events / achieved,
        count=metric_sum(samples, "settler_settle_latency_seconds_count"),
        settle_p50_s=histogram_quantile(samples, "settler_settle_latency_seconds", 0.5),
        settle_p99_s=histogram_quantile(samples, "settler_settle_latency_seconds", 0.99),
        batch_p50_s=histogram_quantile(samples, "settler_batch_seconds", 0.5),
        batch_p99_s=histogram_quantile(samples, "settler_batch_seconds", 0.99),
        anomalies=metric_sum(samples, "settler_balance_anomalies_total"),
        cpu={k: v for k, v in cpu.items() if k != "wall_s"},
    )
    progress(f"  latency at {achieved:,.0f} records/s: p50 {1000 * result.settle_p50_s:.1f} ms,"
             f" p99 {1000 * result.settle_p99_s:.1f} ms ({result.count:,.0f} observations)")
    return result
