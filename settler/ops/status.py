"""What `settler status` shows an operator on one screen: the writer lease, each input
partition's committed offset, end and lag, the dead-letter topic by reason, and what a
worker's own endpoint says (role, readiness, events/s and settle p99 of the last minute).

Everything is read where the worker itself keeps it (the lease row, the consumer group,
the topics, /readyz and /metrics) with the same settings. Every read is bounded in time:
Kafka or the database not answering is `Unreachable`, never a wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from cassandra import InvalidRequest
from cassandra.cluster import Cluster, Session
from prometheus_client.parser import text_string_to_metric_families

from settler import kafka, texttable
from settler.config import Settings
from settler.store import cql
from settler.store.lease import CqlLeaseTable, Holder

T = TypeVar("T")

DEFAULT_MAX_LAG = 1000
HEALTHY, LAGGING, UNREACHABLE = 0, 1, 2


class Unreachable(Exception):
    """Kafka or the database did not answer; the message names which one and where."""


@dataclass(frozen=True)
class PartitionView:
    topic: str
    partition: int
    committed: int | None  # None: the group never committed here
    start: int  # the oldest offset the partition still has
    end: int

    @property
    def lag(self) -> int:
        """Records not settled yet: a group without a commit starts at the oldest one."""
        return max(0, self.end - (self.start if self.committed is None else self.committed))


@dataclass(frozen=True)
class WorkerView:
    url: str
    reachable: bool
    error: str = ""
    role: str = ""
    ready: bool = False
    failing: tuple[str, ...] = ()
    events_per_s: float | None = None
    settle_p99_s: float | None = None


@dataclass(frozen=True)
class DeadLetterView:
    topic: str
    exists: bool
    by_reason: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


@dataclass(frozen=True)
class Status:
    at_ms: int
    keyspace: str
    group: str
    writer: Holder | None  # None: no worker ever took the lease in this keyspace
    partitions: list[PartitionView]
    missing_topics: list[str]
    dead_letters: DeadLetterView
    worker: WorkerView
    max_lag: int

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def exit_code(self) -> int:
        return LAGGING if self.lag > self.max_lag else HEALTHY


def default_metrics_url(settings: Settings) -> str:
    """The local worker's endpoint: SETTLER_METRICS_PORT on loopback when the worker
    listens on every address."""
    host = settings.metrics_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{settings.metrics_port}"


# -- the worker's endpoint ----------------------------------------------------------------------


async def http_get(url: str, timeout_s: float) -> tuple[int, str]:
    """A plain HTTP/1.1 GET (the worker's endpoint speaks nothing fancier)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected an http://host:port URL, got {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query

    async def get() -> tuple[int, str]:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                         "Connection: close\r\n\r\n".encode())
            await writer.drain()
            response = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        head, _, body = response.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or not status_line[1].isdigit():
            raise ConnectionError(f"not an HTTP answer from {url}")
        return int(status_line[1]), body.decode("utf-8", "replace")

    return await asyncio.wait_for(get(), timeout_s)


def metric_values(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples of a Prometheus text page by name: [(labels, value), ...]."""
    values: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return values


async def worker_view(base_url: str, timeout_s: float) -> WorkerView:
    base = base_url.rstrip("/")
    for suffix in ("/metrics", "/readyz"):
        base = base.removesuffix(suffix)
    try:
        _, ready_body = await http_get(base + "/readyz", timeout_s)
        _, metrics_text = await http_get(base + "/metrics", timeout_s)
        ready = json.loads(ready_body)
        values = metric_values(metrics_text)
    except (OSError, TimeoutError, ValueError) as exc:
        return WorkerView(base, reachable=False, error=_http_error(exc, timeout_s))

    def single(name: str) -> float | None:
        samples = values.get(name)
        return samples[0][1] if samples else None

    return WorkerView(
        base, reachable=True, role=str(ready.get("role", "")), ready=bool(ready.get("ready")),
        failing=tuple(ready.get("failing", ())),
        events_per_s=single("settler_events_per_second_1m"),
        settle_p99_s=single("settler_settle_latency_p99_seconds_1m"),
    )


# -- reading everything -----------------------------------------------------------------------


@dataclass
class StatusReader:
    """Holds the connections between reads, so `--watch` redraws without reconnecting and
    reads only the dead letters that arrived since the last screen."""

    settings: Settings
    metrics_url: str
    timeout_s: float = 5.0
    max_lag: int = DEFAULT_MAX_LAG
    _cluster: Cluster | None = None
    _session: Session | None = None
    _lease: CqlLeaseTable | None = None
    _admin: AIOKafkaAdminClient | None = None
    _consumer: AIOKafkaConsumer | None = None
    _dlq: AIOKafkaConsumer | None = None
    _dlq_reasons: Counter[str] = field(default_factory=Counter)
    _dlq_assigned: list[TopicPartition] = field(default_factory=list)

    async def __aenter__(self) -> StatusReader:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        for client in (self._dlq, self._consumer):
            if client is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    # aiokafka 0.14 may re-raise a CancelledError of its own task on stop.
                    await asyncio.wait_for(client.stop(), self.timeout_s)
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._admin.close(), self.timeout_s)
        if self._cluster is not None:
            await asyncio.to_thread(self._cluster.shutdown)
        self._dlq = self._consumer = self._admin = None
        self._cluster = self._session = self._lease = None

    async def read(self) -> Status:
        """One consistent-enough screen: the lease, then Kafka, then the worker."""
        writer = await self._writer()
        partitions, missing = await self.partitions()
        dead_letters = await self._dead_letters()
        worker = await worker_view(self.metrics_url, self.timeout_s)
        return Status(int(time.time() * 1000), self.settings.keyspace, self.settings.group_id,
                      writer, partitions, missing, dead_letters, worker, self.max_lag)

    # -- the database -----------------------------------------------------------------------

    async def _writer(self) -> Holder | None:
        where = f"the database at {','.join(self.settings.cql_contact_points)}"
        try:
            if self._lease is None:
                self._cluster, self._session = await asyncio.wait_for(asyncio.to_thread(
                    cql.connect, self.settings, keyspace=self.settings.keyspace), self.timeout_s)
                self._lease = CqlLeaseTable(self._session)
            return await asyncio.wait_for(self._lease.read(), self.timeout_s)
        except TimeoutError:
            raise Unreachable(f"{where} did not answer within {self.timeout_s:g} s") from None
        except InvalidRequest as exc:
            raise Unreachable(f"{where}: {exc} (run `settler schema apply`)") from None
        except cql.TRANSIENT_ERRORS as exc:
            raise Unreachable(f"{where} is unreachable: {_one_line(exc)}") from None

    # -- Kafka -------------------------------------------------------------------------------

    async def _kafka(self, call: Awaitable[T]) -> T:
        where = f"Kafka at {self.settings.kafka_bootstrap}"
        try:
            return await asyncio.wait_for(call, self.timeout_s)
        except TimeoutError:
            raise Unreachable(f"{where} did not answer within {self.timeout_s:g} s") from None
        except (KafkaError, OSError) as exc:
            raise Unreachable(f"{where} is unreachable: {_one_line(exc)}") from None

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None:
            admin = AIOKafkaAdminClient(
                bootstrap_servers=self.settings.kafka_bootstrap, client_id="settler-status",
                request_timeout_ms=int(self.timeout_s * 1000),
                **kafka.security_options(self.settings))
            await self._kafka(admin.start())
            self._admin = admin
        if self._consumer is None:
            # No group: looking must never move or join anything.
            consumer = kafka.consumer(self.settings, group_id=None, client_id="settler-status",
                                      request_timeout_ms=int(self.timeout_s * 1000))
            await self._kafka(consumer.start())
            self._consumer = consumer
        return self._admin, self._consumer

    async def _topic_partitions(self, topics: list[str]) -> dict[str, list[int]]:
        admin, _ = await self._clients()
        described = await self._kafka(admin.describe_topics(topics))
        found: dict[str, list[int]] = {}
        for topic in described:
            if topic.get("error_code") or topic.get("topic") not in topics:
                continue
            found[topic["topic"]] = sorted(p["partition"] for p in topic.get("partitions", ()))
        return found

    async def partitions(self) -> tuple[list[PartitionView], list[str]]:
        admin, consumer = await self._clients()
        topics = list(self.settings.topics)
        found = await self._topic_partitions(topics)
        tps = [TopicPartition(t, p) for t in topics for p in found.get(t, [])]
        if not tps:
            return [], [t for t in topics if t not in found]
        offsets = await self._kafka(admin.list_consumer_group_offsets(self.settings.group_id))
        starts = await self._kafka(consumer.beginning_offsets(tps))
        ends = await self._kafka(consumer.end_offsets(tps))
        views = []
        for tp in tps:
            meta = offsets.get(tp)
            committed = meta.offset if meta is not None and meta.offset >= 0 else None
            views.append(PartitionView(tp.topic, tp.partition, committed, starts[tp], ends[tp]))
        return views, [t for t in topics if t not in found]

    async def _dead_letters(self) -> DeadLetterView:
        topic = self.settings.dlq_topic
        if self._dlq is None:
            partitions = (await self._topic_partitions([topic])).get(topic)
            if not partitions:
                return DeadLetterView(topic, exists=False, by_reason={})
            self._dlq = kafka.consumer(self.settings, group_id=None, client_id="settler-status",
                                       request_timeout_ms=int(self.timeout_s * 1000))
            await self._kafka(self._dlq.start())
            self._dlq_assigned = [TopicPartition(topic, p) for p in partitions]
            self._dlq.assign(self._dlq_assigned)
            await self._kafka(self._dlq.seek_to_beginning(*self._dlq_assigned))
        await self._read_new_dead_letters(self._dlq)
        return DeadLetterView(topic, exists=True, by_reason=dict(self._dlq_reasons))

    async def _read_new_dead_letters(self, consumer: AIOKafkaConsumer) -> None:
        """Count the reasons of the records since the last read, up to today's end; a read
        that makes no progress for the timeout is Kafka not answering."""
        ends = await self._kafka(consumer.end_offsets(self._dlq_assigned))
        pending = {tp for tp in self._dlq_assigned
                   if await self._kafka(consumer.position(tp)) < ends[tp]}
        last_progress = time.monotonic()
        while pending:
            batch = await self._kafka(consumer.getmany(*pending, timeout_ms=500))
            if batch:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > self.timeout_s:
                raise Unreachable(f"Kafka at {self.settings.kafka_bootstrap} did not return "
                                  f"{self.settings.dlq_topic} within {self.timeout_s:g} s")
            for tp, records in batch.items():
                for record in records:
                    if record.offset < ends[tp]:
                        self._dlq_reasons[_reason(record.headers) or "(no reason)"] += 1
            for tp in list(pending):
                if await self._kafka(consumer.position(tp)) >= ends[tp]:
                    pending.discard(tp)


def _http_error(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return _one_line(exc)


def _reason(headers: Any) -> str:
    for key, value in headers or ():
        if key == kafka.REASON_HEADER:
            return bytes(value).decode("utf-8", "replace")
    return ""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# -- showing it ---------------------------------------------------------------------------------


def _utc(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(value: int) -> str:
    return f"{value:,}"


def writer_line(writer: Holder | None, now_ms: int) -> str:
    if writer is None:
        return "none: no worker has taken the lease in this keyspace yet"
    ceiling = f"ts_ceiling {writer.ts_ceiling} ({_utc(writer.ts_ceiling / 1000)})"
    if writer.owner is None:
        return f"none: lease released (epoch {writer.epoch}), {ceiling}"
    left_s = (writer.expires_at_ms - now_ms) / 1000
    expiry = (f"lease expires in {left_s:.1f} s" if left_s >= 0
              else f"lease EXPIRED {-left_s:.1f} s ago (its holder stopped renewing)")
    return f"{writer.owner}  epoch {writer.epoch}  {expiry}  {ceiling}"


def worker_line(worker: WorkerView) -> str:
    if not worker.reachable:
        return f"no worker answering at {worker.url} ({worker.error})"
    readiness = "ready" if worker.ready else f"NOT READY (failing: {', '.join(worker.failing)})"
    rate = "-" if worker.events_per_s is None else f"{worker.events_per_s:,.1f}"
    p99 = "-" if worker.settle_p99_s is None else _duration(worker.settle_p99_s)
    return (f"{worker.url}  role {worker.role}  {readiness}  {rate} events/s  "
            f"settle p99 {p99}  (last minute)")


def _duration(seconds: float) -> str:
    if math.isinf(seconds):
        return "> 2 min"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def render(status: Status) -> str:
    """The screen, about 15 lines for 3 partitions."""
    lines = [
        f"settler status  {_utc(status.at_ms)}  keyspace {status.keyspace}  "
        f"group {status.group}",
        "",
        f"writer  {writer_line(status.writer, status.at_ms)}",
        f"worker  {worker_line(status.worker)}",
        "",
    ]
    if status.partitions:
        rows = [("TOPIC", "PARTITION", "COMMITTED", "END", "LAG")] + [
            (p.topic, str(p.partition), "-" if p.committed is None else _number(p.committed),
             _number(p.end), _number(p.lag))
            for p in status.partitions
        ]
        lines.append(texttable.render(rows))
    for topic in status.missing_topics:
        lines.append(f"input topic {topic} does not exist yet (created on first use)")
    verdict = (f"LAGGING: {_number(status.lag)} records not settled "
               f"(more than --max-lag {_number(status.max_lag)})"
               if status.exit_code == LAGGING else
               f"{_number(status.lag)} records not settled "
               f"(healthy: --max-lag {_number(status.max_lag)})")
    lines += [verdict, ""]
    letters = status.dead_letters
    if not letters.exists:
        lines.append(f"dead letters  none ({letters.topic} does not exist yet)")
    elif not letters.total:
        lines.append(f"dead letters  none in {letters.topic}")
    else:
        reasons = ", ".join(f"{reason} {_number(count)}" for reason, count
                            in sorted(letters.by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"dead letters  {_number(letters.total)} in {letters.topic}: {reasons}")
    return "\n".join(lines)


def document(status: Status) -> dict[str, Any]:
    """The same, for tools (`--json`)."""
    writer = status.writer
    worker = status.worker
    return {
        "at_ms": status.at_ms,
        "keyspace": status.keyspace,
        "group": status.group,
        "exit_code": status.exit_code,
        "healthy": status.exit_code == HEALTHY,
        "writer": None if writer is None else {
            "owner": writer.owner, "epoch": writer.epoch, "expires_at_ms": writer.expires_at_ms,
            "ts_ceiling": writer.ts_ceiling,
            "live": writer.owner is not None and writer.expires_at_ms > status.at_ms,
        },
        "partitions": [
            {"topic": p.topic, "partition": p.partition, "committed": p.committed,
             "start": p.start, "end": p.end, "lag": p.lag}
            for p in status.partitions
        ],
        "missing_topics": status.missing_topics,
        "lag": status.lag,
        "max_lag": status.max_lag,
        "dead_letters": {"topic": status.dead_letters.topic,
                         "exists": status.dead_letters.exists,
                         "total": status.dead_letters.total,
                         "by_reason": status.dead_letters.by_reason},
        "worker": {
            "url": worker.url, "reachable": worker.reachable, "error": worker.error or None,
            "role": worker.role or None, "ready": worker.ready if worker.reachable else None,
            "failing": list(worker.failing),
            "events_per_s": worker.events_per_s,
            "settle_p99_s": None if worker.settle_p99_s is None or math.isinf(
                worker.settle_p99_s) else worker.settle_p99_s,
        },
    }
