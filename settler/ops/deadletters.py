"""The dead-letter topic for operators (`settler dlq`): read records, show one, and
re-publish chosen ones to the input topic once the cause is fixed upstream.

A dead letter is the original record (bytes, key, headers) plus `settler.reason`,
`settler.source` (topic/partition/offset) and `settler.detail` headers (settler.kafka).
Re-publishing strips the `settler.*` headers so the record goes back as it first came.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from settler import kafka
from settler.config import Settings
from settler.ops.replay import topic_partitions

FETCH_TIMEOUT_MS = 1000
IDLE_FETCHES = 10  # empty fetches in a row before a read that has not reached the end stops


class DeadLetterError(Exception):
    """What was asked for is not in the dead-letter topic; the message says what is."""


@dataclass(frozen=True)
class Position:
    """A record of the dead-letter topic: `OFFSET` (partition 0) or `PARTITION:OFFSET`."""

    partition: int
    offset: int

    @classmethod
    def parse(cls, text: str) -> Position:
        partition, _, offset = text.rpartition(":")
        try:
            position = cls(int(partition or 0), int(offset))
        except ValueError:
            raise ValueError(f"expected OFFSET or PARTITION:OFFSET, got {text!r}") from None
        if position.partition < 0 or position.offset < 0:
            raise ValueError(f"expected non-negative numbers, got {text!r}")
        return position

    def __str__(self) -> str:
        return f"{self.partition}:{self.offset}"


@dataclass(frozen=True)
class DeadLetter:
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, record: Any) -> DeadLetter:
        return cls(record.partition, record.offset, record.timestamp, record.key,
                   record.value, tuple((k, bytes(v or b"")) for k, v in record.headers or ()))

    @property
    def position(self) -> Position:
        return Position(self.partition, self.offset)

    def header(self, name: str) -> str:
        for key, value in self.headers:
            if key == name:
                return value.decode("utf-8", "replace")
        return ""

    @property
    def reason(self) -> str:
        return self.header(kafka.REASON_HEADER)

    @property
    def source(self) -> str:
        return self.header(kafka.SOURCE_HEADER)

    @property
    def detail(self) -> str:
        return self.header(kafka.DETAIL_HEADER)

    @property
    def original_headers(self) -> list[tuple[str, bytes]]:
        """The headers the record had before it was dead-lettered."""
        return [(k, v) for k, v in self.headers if not k.startswith("settler.")]


def text_of(data: bytes | None, limit: int | None = None) -> str:
    """Bytes for a terminal: UTF-8 where it is, escapes elsewhere; `limit` characters."""
    if data is None:
        return "(none)"
    text = data.decode("utf-8", "backslashreplace")
    text = text.replace("\n", "\\n").replace("\r", "\\r") if limit is not None else text
    if limit is not None and len(text) > limit:
        return text[: max(0, limit - 3)] + "..."
    return text


def _consumer(settings: Settings) -> AIOKafkaConsumer:
    # No group: reading dead letters must never move any committed offset.
    return kafka.consumer(settings, group_id=None, client_id="settler-dlq",
                          enable_auto_commit=False)


async def _stop(consumer: AIOKafkaConsumer) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        # aiokafka 0.14 re-raises a CancelledError of its own task when a group-less
        # consumer stops; it is not a cancellation of ours.
        await consumer.stop()


async def _partitions(settings: Settings) -> list[TopicPartition]:
    topic = settings.dlq_topic
    partitions = await topic_partitions(settings, topic)
    if not partitions:
        raise DeadLetterError(f"dead-letter topic {topic!r} does not exist")
    return [TopicPartition(topic, p) for p in partitions]


@dataclass(frozen=True)
class Listing:
    letters: list[DeadLetter]
    total: int  # committed records the topic holds (all partitions), matching or not


async def read(settings: Settings, *, limit: int | None = None, reason: str | None = None
               ) -> Listing:
    """Dead letters oldest first (per partition), at most `limit`, only `reason` if given."""
    consumer = _consumer(settings)
    await consumer.start()
    try:
        tps = await _partitions(settings)
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, starts[tp])
        letters: list[DeadLetter] = []
        # Read to the end even past `limit`: dead letters are written in transactions, so
        # offsets also count commit markers and aborted records; only reading counts them.
        total = 0
        pending = {tp for tp in tps if ends[tp] > starts[tp]}
        idle = 0
        while pending and idle < IDLE_FETCHES:
            batch = await consumer.getmany(*pending, timeout_ms=FETCH_TIMEOUT_MS)
            idle = 0 if batch else idle + 1
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue
                    total += 1
                    if (reason is None or _reason(record) == reason) and (
                            limit is None or len(letters) < limit):
                        letters.append(DeadLetter.of(record))
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        letters.sort(key=lambda letter: (letter.partition, letter.offset))
        return Listing(letters[:limit] if limit is not None else letters, total)
    finally:
        await _stop(consumer)


def _reason(record: Any) -> str:
    for key, value in record.headers or ():
        if key == kafka.REASON_HEADER:
            return bytes(value).decode("utf-8", "replace")
    return ""


async def fetch(settings: Settings, positions: Sequence[Position]) -> list[DeadLetter]:
    """The dead letters at these positions, in the order asked; DeadLetterError names the
    first one the topic does not have (deleted by retention, or never written)."""
    consumer = _consumer(settings)
    await consumer.start()
    try:
        tps = {tp.partition: tp for tp in await _partitions(settings)}
        consumer.assign(list(tps.values()))
        found: dict[Position, DeadLetter] = {}
        for position in positions:
            if position in found:
                continue
            tp = tps.get(position.partition)
            if tp is None:
                raise DeadLetterError(
                    f"{settings.dlq_topic} has no partition {position.partition}")
            found[position] = await _fetch_one(consumer, tp, position)
        return [found[position] for position in positions]
    finally:
        await _stop(consumer)


async def _fetch_one(consumer: AIOKafkaConsumer, tp: TopicPartition, position: Position
                     ) -> DeadLetter:
    start = (await consumer.beginning_offsets([tp]))[tp]
    end = (await consumer.end_offsets([tp]))[tp]
    if not start <= position.offset < end:
        raise DeadLetterError(
            f"no dead letter at {position} ({tp.topic} partition {tp.partition} holds "
            f"offsets {start}..{end - 1})" if end > start else
            f"no dead letter at {position} (partition {tp.partition} is empty)")
    consumer.seek(tp, position.offset)
    for _ in range(IDLE_FETCHES):
        batch = await consumer.getmany(tp, timeout_ms=FETCH_TIMEOUT_MS, max_records=1)
        for record in batch.get(tp, []):
            if record.offset == position.offset:
                return DeadLetter.of(record)
            if record.offset > position.offset:
                # Compacted away, or a transaction marker sat there.
                raise DeadLetterError(f"no dead letter at {position}")
    raise DeadLetterError(f"dead letter {position} could not be read in time")


@dataclass(frozen=True)
class Sent:
    letter: DeadLetter
    topic: str
    partition: int
    offset: int


async def republish(settings: Settings, letters: Iterable[DeadLetter]) -> list[Sent]:
    """Send each letter's original bytes, key and headers (minus settler.*) to the input
    topic (the first of SETTLER_TOPICS), in order; returns where each landed."""
    topic = settings.topics[0]
    producer = kafka.producer(settings, client_id="settler-dlq")
    await producer.start()
    sent: list[Sent] = []
    try:
        for letter in letters:
            metadata = await producer.send_and_wait(
                topic, value=letter.value, key=letter.key,
                headers=letter.original_headers or None,
            )
            sent.append(Sent(letter, topic, metadata.partition, metadata.offset))
    finally:
        await producer.stop()
    return sent
