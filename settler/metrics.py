"""Prometheus metrics of the worker, in one place; the loop calls the small functions here.

Served with /healthz and /readyz by `serve()` on the metrics port. The metric names are a
contract: deploy/grafana/dashboards/settler.json and docs/OPERATIONS.md query them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from settler import __version__
from settler.timeouts import within

# `*_created` samples double the series count and no dashboard or alert uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

EVENT_TYPES: Final = ("trade", "deposit", "withdraw", "freeze", "unfreeze")
"""The `type` label of settled events (`unknown` is added for undecodable records)."""

RETRY_KINDS: Final = (
    "cql_connect", "cql_read", "cql_write", "cql_lease",
    "kafka_connect", "kafka_fetch", "kafka_commit", "dlq_produce",
)
"""The `kind` label of retries, declared up front so `rate()` is 0, not "no data"."""

ERROR_KINDS: Final = ("cql_write", "batch_too_large", "dlq_produce")

SESSION_ENDS: Final = ("stopped", "lapsed", "abandoned", "fatal")

EVENTS = Counter(
    "settler_events_total",
    "Events handled, by type and outcome (settled, duplicate, invalid, conflict) and reason",
    ["type", "outcome", "reason"],
)
BATCH_SECONDS = Histogram(
    "settler_batch_seconds",
    "Time from issuing a settlement batch to its acknowledgement, retries included",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class RecentWindow:
    """Events handled and settle latencies of the last `seconds`, in one-second slots.

    `settler status` shows a rate and a p99 "over the last minute" from one scrape; a
    counter needs two scrapes for a rate, and a histogram's buckets count since start.
    Latencies go into geometric slots 12 % apart, so a quantile is within 12 %."""

    BOUNDS: Final = tuple(0.0005 * 1.12**i for i in range(110))  # 0.5 ms .. ~2 min

    def __init__(self, seconds: int = 60, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.slot_second = [-1] * seconds
        self.counts = [0] * seconds
        self.latencies = [[0] * (len(self.BOUNDS) + 1) for _ in range(seconds)]
        self.first_event: float | None = None

    def _slot(self) -> int:
        now = int(self.clock())
        index = now % self.seconds
        if self.slot_second[index] != now:
            self.slot_second[index] = now
            self.counts[index] = 0
            self.latencies[index] = [0] * (len(self.BOUNDS) + 1)
        return index

    def _live(self) -> list[int]:
        now = int(self.clock())
        return [i for i, second in enumerate(self.slot_second)
                if now - self.seconds < second <= now]

    def event(self, count: int = 1) -> None:
        if self.first_event is None:
            self.first_event = self.clock()
        self.counts[self._slot()] += count

    def latency(self, seconds: float) -> None:
        self.latencies[self._slot()][bisect_left(self.BOUNDS, seconds)] += 1

    def rate(self) -> float:
        """Events per second over the window, or since the first event if that is later
        (a worker one second old that handled 1,000 events did 1,000/s, not 17/s)."""
        if self.first_event is None:
            return 0.0
        span = min(float(self.seconds), max(1.0, self.clock() - self.first_event))
        return sum(self.counts[i] for i in self._live()) / span

    def quantile(self, q: float) -> float | None:
        """The upper bound of the slot holding the q-quantile; None without observations."""
        totals = [0] * (len(self.BOUNDS) + 1)
        for i in self._live():
            for bucket, count in enumerate(self.latencies[i]):
                totals[bucket] += count
        total = sum(totals)
        if total == 0:
            return None
        cumulative = 0
        for bucket, count in enumerate(totals):
            cumulative += count
            if cumulative >= q * total:
                return self.BOUNDS[bucket] if bucket < len(self.BOUNDS) else math.inf
        return math.inf


RECENT: Final = RecentWindow()


class _RecentHistogram(Histogram):
    """A histogram whose observations also go into RECENT (the loop's call sites stay as
    they are)."""

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        super().observe(amount, exemplar)
        RECENT.latency(amount)


SETTLE_LATENCY = _RecentHistogram(
    "settler_settle_latency_seconds",
    "From the record's Kafka timestamp (produced) to its batch being durable",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
             1, 2, 5, 10, 30, 60),
)
IN_FLIGHT = Gauge("settler_batches_in_flight", "Settlement batches issued, not yet acknowledged")
LAG = Gauge("settler_consumer_lag", "Records behind the partition's end (uncommitted)",
            ["topic", "partition"])
COMMITTED = Gauge("settler_committed_offset", "Last committed offset", ["topic", "partition"])
RETRIES = Counter("settler_retries_total", "Transient failures retried, by kind", ["kind"])
ERRORS = Counter("settler_errors_total", "Non-retryable errors, by kind", ["kind"])
ANOMALIES = Counter(
    "settler_balance_anomalies_total", "Rows left below zero by a settled event", ["asset"]
)
CACHE_ROWS = Gauge("settler_balance_cache_rows", "Balance rows held in memory")
CACHE_IDS = Gauge("settler_remembered_ids", "Settled ids held in memory for duplicate checks")
LAST_SETTLED = Gauge(
    "settler_last_settled_event_timestamp_seconds",
    "Event time of the most recently settled event (age = time() - this)",
)
LAST_SETTLEMENT = Gauge(
    "settler_last_settlement_timestamp_seconds",
    "Wall-clock time at which the most recent settlement batch became durable",
)
WRITER = Gauge("settler_writer_active", "1 while this worker holds the single-writer lease")
LEASE_VALID = Gauge(
    "settler_lease_valid", "1 while the writer lease was renewed in time (writes allowed)"
)
LEASE_LAPSES = Counter(
    "settler_lease_lapses_total", "Times the writer lease lapsed (not renewed in time, or taken)"
)
TIMESTAMP_AHEAD = Gauge(
    "settler_write_timestamp_ahead_seconds",
    "How far the writer's fenced write timestamps run ahead of its clock (a former writer's "
    "clock was ahead)",
)
SESSIONS = Counter(
    "settler_writer_sessions_total", "Writer sessions ended, by why they ended", ["end"]
)
BATCH_SPLITS = Counter(
    "settler_batch_splits_total", "LOGGED batches the database found too large, split in two"
)
REREAD = Counter(
    "settler_reread_partitions_total",
    "Partitions a session started below the group's committed offset, because the database "
    "did not confirm the effects of the records in between (it lost acknowledged writes)",
    ["topic", "partition"],
)
DLQ_VALUE_OMITTED = Counter(
    "settler_dead_letter_value_omitted_total",
    "Dead letters published without their value (larger than the producer's request limit)",
)
BUILD = Info("settler_build", "Version of the running settler")
BUILD.info({"version": __version__})

for _kind in EVENT_TYPES:
    for _outcome in ("settled", "duplicate"):
        EVENTS.labels(_kind, _outcome, "")
for _kind in RETRY_KINDS:
    RETRIES.labels(_kind)
for _kind in ERROR_KINDS:
    ERRORS.labels(_kind)
for _end in SESSION_ENDS:
    SESSIONS.labels(_end)

# The loop counts every event: resolve each label set once, not per call.
_event_children: dict[tuple[str, str, str], Any] = {}


def event(kind: str, outcome: str, reason: str = "", count: int = 1) -> None:
    key = (kind, outcome, reason)
    child = _event_children.get(key)
    if child is None:
        child = _event_children[key] = EVENTS.labels(kind, outcome, reason)
    child.inc(count)
    RECENT.event(count)


def retry(kind: str) -> None:
    RETRIES.labels(kind).inc()


def error(kind: str) -> None:
    ERRORS.labels(kind).inc()


def anomaly(asset: str) -> None:
    ANOMALIES.labels(asset).inc()


def declare_assets(names: Iterable[str]) -> None:
    """Create the anomaly series of every registry asset at 0, so a dashboard shows 0
    (healthy) rather than "no data" before the first anomaly."""
    for name in names:
        ANOMALIES.labels(name)


_last_event_time_s = [0.0]


def settled_at(event_time_ms: int) -> None:
    _last_event_time_s[0] = event_time_ms / 1000
    LAST_SETTLED.set(event_time_ms / 1000)
    LAST_SETTLEMENT.set(time.time())


class Health:
    """What /readyz reports: set by the worker as it connects, takes the lease, etc."""

    def __init__(self) -> None:
        self.checks: dict[str, bool] = {"kafka": False, "cql": False, "partitions": False}
        self.role = "starting"
        self.started = time.time()
        self.error: str | None = None
        """Why the worker is stopping for good (a server refused a setting), for /readyz."""

    def ready(self) -> bool:
        if self.error is not None:
            return False
        if self.role == "standby":
            # Waiting for the lease is healthy; waiting because the database is gone is not.
            return self.checks.get("cql", False)
        return all(self.checks.values())

    def failing(self) -> list[str]:
        return sorted(name for name, ok in self.checks.items() if not ok)

    def body(self) -> bytes:
        body: dict[str, Any] = {
            "ready": self.ready(), "role": self.role, "checks": self.checks,
            "failing": self.failing(), "uptime_s": round(time.time() - self.started, 1),
        }
        if self.error is not None:
            body["error"] = self.error
        return json.dumps(body).encode()

    async def probe(self, check: str, attempt: Callable[[], Awaitable[Any]], *,
                    interval_s: float = 2.0, timeout_s: float = 5.0,
                    transient: Callable[[BaseException], bool] = lambda exc: True) -> None:
        """Keep `checks[check]` equal to the outcome of `attempt()`, run every `interval_s`
        until cancelled. Readiness otherwise follows the latest real call, so an idle worker
        would never notice that its database went away, or came back."""
        while True:
            try:
                await within(timeout_s, attempt())
            except Exception as exc:
                if not transient(exc):
                    raise
                self.checks[check] = False
            else:
                self.checks[check] = True
            await asyncio.sleep(interval_s)


class _HealthCollector(Collector):
    """Readiness as metrics, computed at scrape time from the Health being served, and the
    age of the last settled event (which a plain Gauge could only show as a timestamp)."""

    def __init__(self) -> None:
        self.health: Health | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        health = self.health
        if health is not None:
            yield GaugeMetricFamily("settler_ready", "1 while /readyz answers 200",
                                    value=1.0 if health.ready() else 0.0)
            checks = GaugeMetricFamily("settler_health_check",
                                       "1 while a readiness check passes", labels=["check"])
            for name, ok in sorted(health.checks.items()):
                checks.add_metric([name], 1.0 if ok else 0.0)
            yield checks
        last = _last_event_time_s[0]
        if last > 0:
            yield GaugeMetricFamily(
                "settler_last_settled_event_age_seconds",
                "Now minus the event time of the most recently settled event",
                value=max(0.0, time.time() - last),
            )


_COLLECTOR: Final = _HealthCollector()
REGISTRY.register(_COLLECTOR)


class _RecentCollector(Collector):
    """The last minute's event rate and settle latency p99, computed at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "settler_events_per_second_1m",
            "Events handled (every outcome) per second over the last minute",
            value=RECENT.rate(),
        )
        p99 = RECENT.quantile(0.99)
        if p99 is not None:
            yield GaugeMetricFamily(
                "settler_settle_latency_p99_seconds_1m",
                "99th percentile of produce-to-durable latency over the last minute "
                "(within 12 %)",
                value=p99,
            )


REGISTRY.register(_RecentCollector())


async def serve(host: str, port: int, health: Health,
                collect: Callable[[], None] | None = None) -> asyncio.Server:
    """/metrics (Prometheus text), /healthz (alive), /readyz (200 ready or standby, 503)."""
    _COLLECTOR.health = health

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await within(5, reader.readuntil(b"\r\n\r\n"))
            method, _, rest = request.partition(b" ")
            path = rest.split(b" ", 1)[0].decode("latin-1").split("?")[0] or "/"
            status, ctype, body = _route(path, health, collect)
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            writer.write(head if method == b"HEAD" else head + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass  # a client that went away or never spoke HTTP
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port)


def _route(path: str, health: Health,
           collect: Callable[[], None] | None) -> tuple[str, str, bytes]:
    if path == "/metrics":
        if collect:
            collect()
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest()
    if path == "/healthz":
        return "200 OK", "application/json", b'{"alive": true}'
    if path == "/readyz":
        status = "200 OK" if health.ready() else "503 Service Unavailable"
        return status, "application/json", health.body()
    return "404 Not Found", "text/plain", b"not found: try /metrics, /healthz or /readyz\n"
