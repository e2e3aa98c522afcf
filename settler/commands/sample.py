"""`settler sample`: publish a realistic market stream (settler.ops.sample.market) into the
input topic. `--wait` follows it until the worker has settled it and prints what
happened; `--worker` (what `make run` does) starts `settler run` first and leaves it
running afterwards, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from cassandra import InvalidRequest

from settler import kafka
from settler.config import Settings
from settler.core.registry import load_registry
from settler.ops.sample import MarketShape, Sample, market
from settler.ops.status import (
    StatusReader,
    Unreachable,
    default_metrics_url,
    http_get,
    metric_values,
    worker_view,
)
from settler.store import cql
from settler.store.db import SettlementDb

POLL_S = 0.25
DEFAULT_TIMEOUT_S = 600.0


class SampleError(Exception):
    """The sample could not be published or followed; the message says why."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sample", help="publish a realistic sample market stream into the input topic",
        description="Publish users funded by deposits, orders that freeze what they may "
                    "spend, trades against market makers' orders, cancels and withdrawals "
                    "into the first input topic, each user's records on one partition so "
                    "that settling them in any interleaving of partitions never takes a "
                    "balance below zero.",
    )
    parser.add_argument("--events", type=_positive, default=5000, metavar="N",
                        help="valid events to publish, at least one funding deposit per user "
                             "(default 5000)")
    parser.add_argument("--users", type=_positive, default=200, metavar="N",
                        help="users of the sample, ids 10001 and up (default 200)")
    parser.add_argument("--market-makers", type=_positive, default=2, metavar="N",
                        help="market makers per partition that carries trades (default 2)")
    parser.add_argument("--seed", type=int, default=1, help="the same seed, the same stream "
                        "(ids aside: they start at the clock, so reruns add new events)")
    parser.add_argument("--duplicates", type=_rate, default=0.0, metavar="RATE",
                        help="share of re-sent duplicates (0..1)")
    parser.add_argument("--malformed", type=_rate, default=0.0, metavar="RATE",
                        help="share of invalid records (0..1)")
    parser.add_argument("--wait", action="store_true",
                        help="wait until the worker has settled the sample, then summarize")
    parser.add_argument("--worker", action="store_true",
                        help="start `settler run` first, summarize once the sample is "
                             "settled, and keep the worker running until Ctrl-C (implies "
                             "--wait; what `make run` does)")
    parser.add_argument("--timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT_S,
                        metavar="S",
                        help=f"how long --wait waits (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--metrics", metavar="URL", default=None,
                        help="the settling worker's metrics endpoint, for the summary's "
                             "counts (default: http://127.0.0.1:SETTLER_METRICS_PORT)")
    parser.set_defaults(handler=_sample)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _sample(args: argparse.Namespace, settings: Settings) -> int:
    # The clients here log what their callers report better in one line (a topic that is
    # about to be auto-created, a broker that does not answer); the worker logs its own.
    for name in ("aiokafka", "cassandra"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    run = SampleRun(settings, args)
    if args.worker:
        return asyncio.run(run.with_worker())
    try:
        return asyncio.run(run.publish_and_follow() if args.wait else run.publish_only())
    except SampleError as exc:
        print(f"settler sample: {exc}", file=sys.stderr)
        return 1


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


@dataclass(frozen=True)
class Counts:
    """What the worker counted while settling the sample (differences of its metrics)."""

    settled: Counter[str]  # by event type
    duplicates: int
    dead_letters: Counter[str]  # by reason
    anomalies: int

    @classmethod
    def between(cls, before: dict[str, Any], after: dict[str, Any]) -> Counts:
        def diff(name: str) -> Counter[tuple[tuple[str, str], ...]]:
            counts: Counter[tuple[tuple[str, str], ...]] = Counter()
            for labels, value in after.get(name, []):
                counts[tuple(sorted(labels.items()))] += int(value)
            for labels, value in before.get(name, []):
                counts[tuple(sorted(labels.items()))] -= int(value)
            return counts

        settled: Counter[str] = Counter()
        letters: Counter[str] = Counter()
        duplicates = 0
        for key, count in diff("settler_events_total").items():
            labels = dict(key)
            if labels["outcome"] == "settled":
                settled[labels["type"]] += count
            elif labels["outcome"] == "duplicate":
                duplicates += count
            elif count:
                letters[labels["reason"]] += count
        anomalies = sum(diff("settler_balance_anomalies_total").values())
        return cls(settled, duplicates, +letters, anomalies)


class SampleRun:
    """One `settler sample`: publish, and for --wait / --worker follow and summarize."""

    def __init__(self, settings: Settings, args: argparse.Namespace) -> None:
        self.settings = settings
        self.args = args
        self.metrics_url = args.metrics or default_metrics_url(settings)
        self.config_args = ["--config", str(args.config)] if args.config else []

    # -- publishing -------------------------------------------------------------------------

    async def publish(self) -> Published:
        topic = self.settings.topics[0]
        producer = kafka.producer(self.settings, linger_ms=5)
        try:
            await asyncio.wait_for(producer.start(), 30)
            # Asking for the partitions creates the topic where the broker auto-creates.
            partitions = await asyncio.wait_for(producer.partitions_for(topic), 30)
            with contextlib.suppress(KafkaError, TimeoutError):
                # The dead-letter topic too, or the worker's first dead letter is preceded
                # by the client logging an error about the topic not existing yet.
                await asyncio.wait_for(producer.partitions_for(self.settings.dlq_topic), 10)
            base = time.time_ns() // 1000
            # Ids start at a clock-derived base so that a second run adds new events
            # instead of re-sending (and so skipping) the first run's.
            sample = market(load_registry(self.settings.registry), MarketShape(
                events=self.args.events, users=self.args.users, partitions=len(partitions),
                market_makers=self.args.market_makers, seed=self.args.seed,
                duplicate_rate=self.args.duplicates, malformed_rate=self.args.malformed,
                first_trade_id=base, first_event_id=base, first_order_id=base))
            started = time.monotonic()
            futures = [await producer.send(topic, value=r.value, key=r.key,
                                           partition=r.partition) for r in sample.records]
            written = await asyncio.wait_for(asyncio.gather(*futures), 120)
        except (KafkaError, TimeoutError, OSError) as exc:
            raise SampleError(f"cannot publish to Kafka at {self.settings.kafka_bootstrap}: "
                              f"{exc!r}") from None
        finally:
            with contextlib.suppress(Exception):
                await producer.stop()
        ends: dict[TopicPartition, int] = {}
        for meta in written:
            tp = TopicPartition(meta.topic, meta.partition)
            ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
        return Published(sample, topic, ends, started)

    async def publish_only(self) -> int:
        print((await self.publish()).describe())
        return 0

    # -- following ---------------------------------------------------------------------------

    async def publish_and_follow(self) -> int:
        async with StatusReader(self.settings, self.metrics_url) as reader:
            backlog = await self._caught_up(reader, None, self.args.timeout)
            if backlog:
                print(f"settled {backlog:,} records that earlier runs left first", flush=True)
            before = await self._metrics(final=False)
            published = await self.publish()
            print(published.describe(), flush=True)
            await self._caught_up(reader, published.ends, self.args.timeout)
            took = time.monotonic() - published.started
            after = await self._metrics(final=True)
        negative, users = await self._negative_rows(published.sample)
        counts = Counts.between(before, after) if before and after else None
        print(summary(published, counts, negative, users, took, self.metrics_url))
        print(next_steps(self.settings, published.sample, self.config_args))
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

    # -- make run ----------------------------------------------------------------------------

    async def with_worker(self) -> int:
        """Start `settler run`, publish and follow the sample, then leave the worker running
        until it stops (Ctrl-C or SIGTERM, passed on to it); its exit code is ours."""
        print(f"starting the worker (settler run): metrics {self.metrics_url}/metrics, its "
              "logs below; stop it with Ctrl-C", flush=True)
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "settler", *self.config_args, "run")
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def forward(signum: int) -> None:
            stopping.set()
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, forward, signum)
        exited = asyncio.ensure_future(child.wait())
        following = asyncio.ensure_future(self._follow_for_worker())
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

    async def _follow_for_worker(self) -> bool:
        """False when the sample could not be published or followed (said on stderr). The
        worker is left running either way: it may still be settling, or retrying a broker
        that is down, which its log shows."""
        try:
            await self._wait_for_endpoint()
            await self.publish_and_follow()
        except (SampleError, Unreachable) as exc:
            print(f"settler sample: {exc}", file=sys.stderr)
            followed = False
        else:
            followed = True
        print("the worker keeps running: Ctrl-C stops it (then `make down` stops Kafka and "
              "Cassandra)", flush=True)
        return followed

    async def _wait_for_endpoint(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not (await worker_view(self.metrics_url, 2.0)).reachable:
            if time.monotonic() > deadline:
                raise SampleError(f"the worker's endpoint {self.metrics_url} did not answer "
                                  f"within {timeout_s:g} s")
            await asyncio.sleep(POLL_S)


def summary(published: Published, counts: Counts | None, negative: int, users: int,
            took_s: float, metrics_url: str) -> str:
    """What happened, in a few lines: the end of `make run`'s first screen."""
    sample = published.sample
    lines = ["", f"sample settled in {took_s:.1f} s: {len(sample.records):,} records in "
                 f"{published.topic} ({sample.partitions} partitions)"]
    if counts is None:
        lines.append(f"  (no counts: the worker at {metrics_url} did not answer, or is a "
                     "standby while another worker settles)")
    else:
        events = sum(counts.settled.values()) - counts.settled["trade"]
        lines.append(f"  {counts.settled['trade']:,} trades and {events:,} balance events "
                     f"settled, {counts.duplicates:,} duplicates skipped")
        if counts.dead_letters:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(counts.dead_letters.items()))
            lines.append(f"  {sum(counts.dead_letters.values()):,} dead letters ({reasons}): "
                         "the malformed records the sample put in on purpose")
        else:
            lines.append("  0 dead letters")
    anomalies = "?" if counts is None else f"{counts.anomalies:,}"
    lines.append(f"  {anomalies} balance anomalies, {negative:,} negative balances "
                 f"({users:,} users and the fee account read back)")
    return "\n".join(lines)


def settler_command() -> str:
    """How to call this settler from the user's shell: `settler` when that is on PATH,
    else the path of the one running now (`.venv/bin/settler` under `make run`)."""
    here = Path(sys.executable).parent / "settler"
    found = shutil.which("settler")
    if found and Path(found).resolve() == here.resolve():
        return "settler"
    with contextlib.suppress(ValueError):
        return str(here.relative_to(Path.cwd()))
    return str(here)


def next_steps(settings: Settings, sample: Sample, config_args: list[str]) -> str:
    """Three things to try next, ready to paste, about a real user of the sample."""
    settler = " ".join([settler_command(), *config_args])
    user = busiest_user(sample)
    api = f"http://{settings.api_host}:{settings.api_port}"
    return "\n".join([
        "",
        "next steps, in another terminal:",
        f"  {settler} balances {user}",
        f"  KEY=$({settler} keys create {user} | sed -n 's/^api_key: //p')",
        f"  {settler} api & curl --retry 10 --retry-connrefused -H \"X-API-Key: $KEY\" "
        f"{api}/v1/balances",
        f"  {settler} status",
    ])


def busiest_user(sample: Sample) -> int:
    """The user on the most trades (a market maker: open orders, fees, both assets), or
    the one with the most records when nobody trades."""
    trades: Counter[int] = Counter()
    records: Counter[int] = Counter()
    for record in sample.records:
        if record.expect is not None or record.duplicate:
            continue
        body = json.loads(record.value)
        if body["type"] == "trade":
            trades.update((body["buyer_user_id"], body["seller_user_id"]))
        else:
            records[body["user_id"]] += 1
    ranked = trades or records
    return ranked.most_common(1)[0][0] if ranked else min(sample.home)
