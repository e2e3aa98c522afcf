"""A writer session's Kafka clients: its consumer (the group member that fetches) and its
transactional producer (dead letters and offsets, settler.worker.committing).

Both connect with retries, for as long as the session goes on; the producer's start is
what fences former writers' producers (`settler.kafka.transactional_id`). Both are closed
within the SIGTERM budget.
"""

from __future__ import annotations

import asyncio
from typing import Final

from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from settler import kafka, logs, metrics
from settler.core.offsets import Offsets
from settler.timeouts import within
from settler.worker.ports import Clients
from settler.worker.retry import Retrier

log = logs.get("settler.worker")

TOPIC_LOOKUP_TIMEOUT_S: Final = 5.0
LAG_INTERVAL_S: Final = 5.0
LAG_TIMEOUT_S: Final = 10.0


class KafkaClients:
    def __init__(self, clients: Clients, *, dlq_topic: str, health: metrics.Health) -> None:
        self.consumer = clients.consumer()
        self.producer = clients.producer()
        self.dlq_topic = dlq_topic
        self.health = health

    async def start(self, retrier: Retrier, topics: tuple[str, ...],
                    listener: ConsumerRebalanceListener) -> None:
        """Connect (retrying while the brokers are down; a refused login or certificate
        raises at once), then join the group."""
        await retrier.run("kafka_connect", self.consumer.start, kafka.is_transient)
        await retrier.run("kafka_connect", self.producer.start, kafka.is_transient)
        await self._dead_letter_topic()
        self.health.checks["kafka"] = True
        self.consumer.subscribe(list(topics), listener=listener)

    async def _dead_letter_topic(self) -> None:
        """Ask for the dead-letter topic's metadata up front (a broker that creates topics
        creates it now), so the first dead letter does not wait for it."""
        topic = self.dlq_topic
        try:
            found = await within(TOPIC_LOOKUP_TIMEOUT_S, self.producer.partitions_for(topic))
        except (KafkaError, TimeoutError) as exc:
            found = None
            log.warning("dead-letter topic not found yet; dead letters wait for it",
                        topic=topic, error=repr(exc))
        if found is not None and not found:
            log.warning("dead-letter topic has no partitions yet", topic=topic)

    async def report_lag(self, offsets: Offsets[TopicPartition]) -> None:
        """Lag against the brokers' end offsets every few seconds, so that it grows while
        settling is stalled (database down) instead of freezing at the last commit."""
        while True:
            await asyncio.sleep(LAG_INTERVAL_S)
            assigned = list(self.consumer.assignment())
            committed = offsets.last_committed()
            try:
                ends = await within(LAG_TIMEOUT_S, self.consumer.end_offsets(assigned))
            except (KafkaError, TimeoutError):
                continue
            for tp, end in ends.items():
                if tp in committed:
                    metrics.LAG.labels(tp.topic, tp.partition).set(max(0, end - committed[tp]))

    async def close(self, timeout_s: float) -> None:
        await asyncio.gather(kafka.stop_quietly(self.consumer, timeout_s),
                             kafka.stop_quietly(self.producer, timeout_s))
