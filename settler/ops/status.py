"""What `settler status` reads for an operator's one screen: the writer lease, each input
partition's committed offset, end and lag, the dead-letter topic by reason, and what a
worker's own endpoint says (settler.ops.worker_endpoint); settler.ops.status_view shows it.

Everything is read where the worker itself keeps it (the lease row, the consumer group,
the topics, /readyz and /metrics) with the same settings. Every read is bounded in time:
Kafka or the database not answering is `Unreachable`, never a wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from cassandra import InvalidRequest
from cassandra.cluster import Cluster, Session

from settler import kafka
from settler.config import Settings
from settler.ops.worker_endpoint import WorkerView, worker_view
from settler.store import cql
from settler.store.lease import CqlLeaseTable, Holder
from settler.timeouts import within

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


async def _bounded(settings: Settings, timeout_s: float, call: Awaitable[T]) -> T:
    """A Kafka call within the timeout, or Unreachable naming the bootstrap servers."""
    where = f"Kafka at {settings.kafka_bootstrap}"
    try:
        return await within(timeout_s, call)
    except TimeoutError:
        raise Unreachable(f"{where} did not answer within {timeout_s:g} s") from None
    except (KafkaError, OSError) as exc:
        raise Unreachable(f"{where} is unreachable: {_one_line(exc)}") from None


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
    _tally: _DeadLetterTally | None = None

    async def __aenter__(self) -> StatusReader:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._tally is not None:
            await kafka.stop_quietly(self._tally.consumer, self.timeout_s)
        await kafka.stop_quietly(self._consumer, self.timeout_s)
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await within(self.timeout_s, self._admin.close())
        if self._cluster is not None:
            await asyncio.to_thread(self._cluster.shutdown)
        self._tally = None
        self._consumer = self._admin = None
        self._cluster = self._session = self._lease = None

    async def read(self) -> Status:
        """One consistent-enough screen: the lease, then Kafka, then the worker."""
        writer = await self._writer()
        partitions, missing = await self.partitions()
        dead_letters = await self._dead_letters()
        worker = await worker_view(self.metrics_url, self.timeout_s)
        return Status(int(time.time() * 1000), self.settings.keyspace, self.settings.group_id,
                      writer, partitions, missing, dead_letters, worker, self.max_lag)

    async def _writer(self) -> Holder | None:
        where = f"the database at {','.join(self.settings.cql_contact_points)}"
        try:
            if self._lease is None:
                self._cluster, self._session = await within(self.timeout_s, asyncio.to_thread(
                    cql.connect, self.settings, keyspace=self.settings.keyspace))
                self._lease = CqlLeaseTable(self._session)
            return await within(self.timeout_s, self._lease.read())
        except TimeoutError:
            raise Unreachable(f"{where} did not answer within {self.timeout_s:g} s") from None
        except InvalidRequest as exc:
            raise Unreachable(f"{where}: {exc} (run `settler schema apply`)") from None
        except cql.TRANSIENT_ERRORS as exc:
            raise Unreachable(f"{where} is unreachable: {_one_line(exc)}") from None

    async def _kafka(self, call: Awaitable[T]) -> T:
        return await _bounded(self.settings, self.timeout_s, call)

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
        if self._tally is None:
            partitions = (await self._topic_partitions([topic])).get(topic)
            if not partitions:
                return DeadLetterView(topic, exists=False, by_reason={})
            consumer = kafka.consumer(self.settings, group_id=None, client_id="settler-status",
                                      request_timeout_ms=int(self.timeout_s * 1000))
            self._tally = _DeadLetterTally(self.settings, self.timeout_s, consumer)
            await self._tally.start([TopicPartition(topic, p) for p in partitions])
        await self._tally.read_new()
        return DeadLetterView(topic, exists=True, by_reason=dict(self._tally.reasons))


@dataclass
class _DeadLetterTally:
    """The dead letters by reason, each record counted once: its consumer (no group) keeps
    its position between screens, so a redraw reads only what arrived since."""

    settings: Settings
    timeout_s: float
    consumer: AIOKafkaConsumer
    assigned: list[TopicPartition] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)

    async def start(self, partitions: list[TopicPartition]) -> None:
        await _bounded(self.settings, self.timeout_s, self.consumer.start())
        self.assigned = partitions
        self.consumer.assign(partitions)
        await _bounded(self.settings, self.timeout_s, self.consumer.seek_to_beginning(*partitions))

    async def read_new(self) -> None:
        """Count the reasons of the records since the last read, up to today's end; a read
        that makes no progress for the timeout is Kafka not answering."""
        consumer = self.consumer

        async def kafka_call(call: Awaitable[T]) -> T:
            return await _bounded(self.settings, self.timeout_s, call)

        ends = await kafka_call(consumer.end_offsets(self.assigned))
        pending = {tp for tp in self.assigned if await kafka_call(consumer.position(tp)) < ends[tp]}
        last_progress = time.monotonic()
        while pending:
            batch = await kafka_call(consumer.getmany(*pending, timeout_ms=500))
            if batch:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > self.timeout_s:
                raise Unreachable(f"Kafka at {self.settings.kafka_bootstrap} did not return "
                                  f"{self.settings.dlq_topic} within {self.timeout_s:g} s")
            for tp, records in batch.items():
                for record in records:
                    if record.offset < ends[tp]:
                        self.reasons[_reason(record.headers) or "(no reason)"] += 1
            for tp in list(pending):
                if await kafka_call(consumer.position(tp)) >= ends[tp]:
                    pending.discard(tp)


def _reason(headers: Any) -> str:
    for key, value in headers or ():
        if key == kafka.REASON_HEADER:
            return bytes(value).decode("utf-8", "replace")
    return ""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
