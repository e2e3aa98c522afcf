"""Prometheus metrics of the worker, in one place; the loop calls the small functions here.

Served with /healthz and /readyz by `serve()` on the metrics port. The metric names are a
contract: deploy/grafana/dashboards/settler.json and docs/OPERATIONS.md query them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
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

# `*_created` samples double the series count and no dashboard or alert uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

EVENT_TYPES: Final = ("trade", "deposit", "withdraw", "freeze", "unfreeze")
"""The `type` label of settled events (`unknown` is added for undecodable records)."""

RETRY_KINDS: Final = (
    "cql_connect", "cql_read", "cql_write", "cql_lease",
    "kafka_connect", "kafka_fetch", "kafka_commit", "dlq_produce",
)
"""The `kind` label of retries, declared up front so `rate()` is 0, not "no data"."""

ERROR_KINDS: Final = ("cql_write",)

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
SETTLE_LATENCY = Histogram(
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
BUILD = Info("settler_build", "Version of the running settler")
BUILD.info({"version": __version__})

for _kind in EVENT_TYPES:
    for _outcome in ("settled", "duplicate"):
        EVENTS.labels(_kind, _outcome, "")
for _kind in RETRY_KINDS:
    RETRIES.labels(_kind)
for _kind in ERROR_KINDS:
    ERRORS.labels(_kind)

# The loop counts every event: resolve each label set once, not per call.
_event_children: dict[tuple[str, str, str], Any] = {}


def event(kind: str, outcome: str, reason: str = "") -> None:
    key = (kind, outcome, reason)
    child = _event_children.get(key)
    if child is None:
        child = _event_children[key] = EVENTS.labels(kind, outcome, reason)
    child.inc()


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
        return self.role == "standby" or all(self.checks.values())

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
                await asyncio.wait_for(attempt(), timeout_s)
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


async def serve(host: str, port: int, health: Health,
                collect: Callable[[], None] | None = None) -> asyncio.Server:
    """/metrics (Prometheus text), /healthz (alive), /readyz (200 ready or standby, 503)."""
    _COLLECTOR.health = health

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
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
