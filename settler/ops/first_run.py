"""`settler sample` and `make run`'s first screen: publish a market sample into the input
topic and, when asked, follow the worker's group until it has settled it, read the
balances back, and summarize (first_run_report.py); or first start `settler run` as a
child process and leave it running afterwards, until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from cassandra import InvalidRequest

from settler import kafka
from settler.config import Settings
from settler.core.registry import load_registry
from settler.ops.first_run_report import Counts, next_steps, summary
from settler.ops.sample import MarketShape, Sample, market
from settler.ops.status import StatusReader, Unreachable, default_metrics_url
from settler.ops.worker_endpoint import http_get, metric_values, worker_view
from settler.store import cql
from settler.store.db import SettlementDb
from settler.timeouts import within

POLL_S = 0.25
DEFAULT_TIMEOUT_S = 600.0


class SampleError(Exception):
    """The sample could not be published or followed; the message says why."""


@dataclass(frozen=True)
class SampleOptions:
    """What `settler sample` was asked for (its command-line options, parsed)."""

    events: int
    users: int
    market_makers: int
    seed: int
    duplicates: float
    malformed: float
    timeout_s: float = DEFAULT_TIMEOUT_S
    metrics: str | None = None  # the worker's endpoint; None: SETTLER_METRICS_PORT locally
    config: Path | None = None  # the --config file, passed on to the worker and next steps

    def metrics_url(self, settings: Settings) -> str:
        return self.metrics or default_metrics_url(settings)

    def config_args(self) -> list[str]:
        return ["--config", str(self.config)] if self.config else []


@dataclass
class Published:
    """A sample in the topic, and where it ends in each partition."""

    sample: Sample
    topic: str
    ends: dict[TopicPartition, int]  # one past the last offset written, per partition
    started: float  # monotonic time the publishing began

    def describe(self) -> str:
        sample = self.sample
        kinds = sample.kinds
        faults = ""
        if sample.duplicates or sample.malformed:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(sample.malformed.items()))
            faults = (f"; on purpose: {sample.duplicates:,} duplicates, "
                      f"{sum(sample.malformed.values()):,} malformed"
                      + (f" ({reasons})" if reasons else ""))
        return (f"published {len(sample.records):,} sample records to {self.topic} "
                f"({sample.partitions} partitions): {len(sample.home):,} users "
                f"({len(sample.market_makers)} market makers), {kinds['trade']:,} trades, "
                f"{kinds['deposit']:,} deposits, {kinds['freeze']:,} freezes, "
                f"{kinds['unfreeze']:,} unfreezes, {kinds['withdraw']:,} withdrawals"
                + faults)


async def publish(settings: Settings, options: SampleOptions) -> Published:
    """Generate a market sample for the first input topic's partitions and publish it."""
    topic = settings.topics[0]
    producer = kafka.producer(settings, linger_ms=5)
    try:
        await within(30, producer.start())
        # Asking for the partitions creates the topic where the broker auto-creates.
        partitions = await within(30, producer.partitions_for(topic))
        with contextlib.suppress(KafkaError, TimeoutError):
            # The dead-letter topic too, or the worker's first dead letter is preceded
            # by the client logging an error about the topic not existing yet.
            await within(10, producer.partitions_for(settings.dlq_topic))
        base = time.time_ns() // 1000
        # Ids start at a clock-derived base so that a second run adds new events
        # instead of re-sending (and so skipping) the first run's.
        sample = market(load_registry(settings.registry), MarketShape(
            events=options.events, users=options.users, partitions=len(partitions),
            market_makers=options.market_makers, seed=options.seed,
            duplicate_rate=options.duplicates, malformed_rate=options.malformed,
            first_trade_id=base, first_event_id=base, first_order_id=base))
        started = time.monotonic()
        futures = [await producer.send(topic, value=r.value, key=r.key,
                                       partition=r.partition) for r in sample.records]
        written = await within(120, asyncio.gather(*futures))
    except (KafkaError, TimeoutError, OSError) as exc:
        raise SampleError(f"cannot publish to Kafka at {settings.kafka_bootstrap}: "
                          f"{exc!r}") from None
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
    ends: dict[TopicPartition, int] = {}
    for meta in written:
        tp = TopicPartition(meta.topic, meta.partition)
        ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
    return Published(sample, topic, ends, started)


async def publish_only(settings: Settings, options: SampleOptions) -> int:
    print((await publish(settings, options)).describe())
    return 0


async def publish_and_follow(settings: Settings, options: SampleOptions) -> int:
    """Publish, wait until the group has settled the sample, summarize; 1 when a balance
    went below zero or the worker counted an anomaly."""
    return await _Follower(settings, options).run()


class _Follower:
    """Publishes once the group has caught up with what earlier runs left, then follows
    the committed offsets to the sample's ends and reads the outcome back."""

    def __init__(self, settings: Settings, options: SampleOptions) -> None:
        self.settings = settings
        self.options = options
        self.metrics_url = options.metrics_url(settings)

    async def run(self) -> int:
        async with StatusReader(self.settings, self.metrics_url) as reader:
            backlog = await self._caught_up(reader, None, self.options.timeout_s)
            if backlog:
                print(f"settled {backlog:,} records that earlier runs left first", flush=True)
            before = await self._metrics(final=False)
            published = await publish(self.settings, self.options)
            print(published.describe(), flush=True)
            await self._caught_up(reader, published.ends, self.options.timeout_s)
            took = time.monotonic() - published.started
            after = await self._metrics(final=True)
        negative, users = await self._negative_rows(published.sample)
        counts = Counts.between(before, after) if before and after else None
        print(summary(published.sample, published.topic, counts, negative, users, took,
                      self.metrics_url))
        print(next_steps(self.settings, published.sample, self.options.config_args()))
        clean = negative == 0 and (counts is None or counts.anomalies == 0)
        return 0 if clean else 1

    async def _caught_up(self, reader: StatusReader, ends: dict[TopicPartition, int] | None,
                         timeout_s: float) -> int:
        """Wait until the group has committed up to `ends` (None: the partitions' ends
        now); returns how many records that took."""
        deadline = time.monotonic() + timeout_s
        first_lag: int | None = None
        while True:
            views, _ = await reader.partitions()
            if ends is None:
                ends = {TopicPartition(v.topic, v.partition): v.end for v in views}
            left = 0
            for view in views:
                target = ends.get(TopicPartition(view.topic, view.partition))
                if target is not None:
                    done = view.start if view.committed is None else view.committed
                    left += max(0, target - done)
            first_lag = left if first_lag is None else first_lag
            if left == 0:
                return first_lag
            if time.monotonic() > deadline:
                raise SampleError(f"not settled after {timeout_s:g} s: {left:,} records to "
                                  "go (`settler status` shows where)")
            await asyncio.sleep(POLL_S)

    async def _metrics(self, *, final: bool) -> dict[str, Any] | None:
        """The worker's metrics, or None when it does not answer, or when at the end it is
        a standby (another worker settled; a worker starts as a standby until it has the
        lease, so that says nothing before)."""
        view = await worker_view(self.metrics_url, 5.0)
        if not view.reachable or (final and view.role == "standby"):
            return None
        _, text = await http_get(self.metrics_url.rstrip("/") + "/metrics", 5.0)
        return metric_values(text)

    async def _negative_rows(self, sample: Sample) -> tuple[int, int]:
        """Rows below zero among the sample's users and the fee account, read back."""
        users = sorted(sample.home)
        try:
            db = await SettlementDb.open(self.settings)
        except (*cql.TRANSIENT_ERRORS, InvalidRequest) as exc:
            raise SampleError(f"cannot read balances in keyspace {self.settings.keyspace}: "
                              f"{exc}") from None
        gate = asyncio.Semaphore(32)

        async def negatives(user: int) -> int:
            async with gate:
                rows = await db.get_user_all_balances(user)
            return sum(1 for row in rows if row.available < 0 or row.frozen < 0)

        try:
            counts = await asyncio.gather(*(negatives(u) for u in users))
        finally:
            await db.close()
        return sum(counts), len(users)


async def with_worker(settings: Settings, options: SampleOptions) -> int:
    """Start `settler run`, publish and follow the sample, then leave the worker running
    until it stops (Ctrl-C or SIGTERM, passed on to it); its exit code is ours."""
    metrics_url = options.metrics_url(settings)
    print(f"starting the worker (settler run): metrics {metrics_url}/metrics, its "
          "logs below; stop it with Ctrl-C", flush=True)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "settler", *options.config_args(), "run")
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def forward(signum: int) -> None:
        stopping.set()
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, forward, signum)
    exited = asyncio.ensure_future(child.wait())
    following = asyncio.ensure_future(_follow_beside_worker(settings, options))
    await asyncio.wait({exited, following}, return_when=asyncio.FIRST_COMPLETED)
    if not following.done():
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
        if not stopping.is_set():
            print(f"settler sample: the worker exited with code {child.returncode} "
                  "before the sample was settled (its log is above)", file=sys.stderr)
            return child.returncode or 1
        return await exited  # stopped (Ctrl-C) before the sample was settled
    followed = following.result()
    code = await exited
    return code if followed else (code or 1)


async def _follow_beside_worker(settings: Settings, options: SampleOptions) -> bool:
    """False when the sample could not be published or followed (said on stderr). The
    worker is left running either way: it may still be settling, or retrying a broker
    that is down, which its log shows."""
    try:
        await _wait_for_endpoint(options.metrics_url(settings))
        await publish_and_follow(settings, options)
    except (SampleError, Unreachable) as exc:
        print(f"settler sample: {exc}", file=sys.stderr)
        followed = False
    else:
        followed = True
    print("the worker keeps running: Ctrl-C stops it (then `make down` stops Kafka and "
          "Cassandra)", flush=True)
    return followed


async def _wait_for_endpoint(metrics_url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (await worker_view(metrics_url, 2.0)).reachable:
        if time.monotonic() > deadline:
            raise SampleError(f"the worker's endpoint {metrics_url} did not answer "
                              f"within {timeout_s:g} s")
        await asyncio.sleep(POLL_S)
