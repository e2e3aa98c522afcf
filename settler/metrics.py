"""Prometheus metrics of the worker, in one place; the loop calls the small functions here.

Served with /healthz and /readyz by `serve()` on the metrics port.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

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
ERRORS = Counter("settler_errors_total", "Errors, by kind", ["kind"])
ANOMALIES = Counter(
    "settler_balance_anomalies_total", "Rows left below zero by a settled event", ["asset"]
)
CACHE_ROWS = Gauge("settler_balance_cache_rows", "Balance rows held in memory")
CACHE_IDS = Gauge("settler_remembered_ids", "Settled ids held in memory for duplicate checks")
LAST_SETTLED = Gauge(
    "settler_last_settled_event_timestamp_seconds",
    "Event time of the most recently settled event (age = time() - this)",
)
WRITER = Gauge("settler_writer_active", "1 while this worker holds the single-writer lease")


def event(kind: str, outcome: str, reason: str = "") -> None:
    EVENTS.labels(kind, outcome, reason).inc()


def retry(kind: str) -> None:
    RETRIES.labels(kind).inc()


def error(kind: str) -> None:
    ERRORS.labels(kind).inc()


def anomaly(asset: str) -> None:
    ANOMALIES.labels(asset).inc()


def settled_at(event_time_ms: int) -> None:
    LAST_SETTLED.set(event_time_ms / 1000)


class Health:
    """What /readyz reports: set by the worker as it connects, takes the lease, etc."""

    def __init__(self) -> None:
        self.checks: dict[str, bool] = {"kafka": False, "cql": False, "partitions": False}
        self.role = "starting"
        self.started = time.time()

    def ready(self) -> bool:
        return self.role == "standby" or all(self.checks.values())

    def body(self) -> bytes:
        return json.dumps(
            {"ready": self.ready(), "role": self.role, "checks": self.checks}
        ).encode()


async def serve(host: str, port: int, health: Health,
                collect: Callable[[], None] | None = None) -> asyncio.Server:
    """/metrics (Prometheus text), /healthz (alive), /readyz (200 ready or standby, 503)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            path = request.split(b" ", 2)[1].decode("latin-1") if b" " in request else "/"
            status, ctype, body = _route(path.split("?")[0], health, collect)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # a client that went away or never spoke HTTP
        finally:
            writer.close()

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
    return "404 Not Found", "text/plain", b"not found\n"
