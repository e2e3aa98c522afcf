"""Dead letters: the records the worker refuses, queued until the transaction that commits
an offset past them publishes them (the commit rule, settler.worker.committing).

A letter carries the record's key, value and headers plus why and where from (SPEC §4).
A letter above the producer's request limit, or whose value the broker refused once, is
published without its value (header `settler.value-omitted`: the original size). A record
re-read below the group's commit at assignment is not published again: it went out in
the transaction that committed past it. One re-read below the highest offset ever
committed is a replay, marked `settler.ops.replay`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from aiokafka import TopicPartition
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from settler import kafka, logs, metrics
from settler.core.offsets import Offsets
from settler.worker.intake import Item

log = logs.get("settler.worker")

REPLAY_HEADER: Final = "settler.ops.replay"
OMITTED_HEADER: Final = "settler.value-omitted"
REQUEST_OVERHEAD_BYTES: Final = 512  # request and batch headers around one record


@dataclass(slots=True)
class Letter:
    tp: TopicPartition
    offset: int
    event_kind: str
    reason: str
    detail: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class DeadLetters:
    """One session's queued dead letters, in the order their records were read."""

    def __init__(self, *, offsets: Offsets[TopicPartition], replayed_below: dict[str, int],
                 max_request_bytes: int, refused_values: set[tuple[str, int, int]]) -> None:
        self.offsets = offsets
        self.max_request_bytes = max_request_bytes
        # Dead letters whose value the broker refused (the topic's own size limit), by
        # source position: for the worker's lifetime, since a refusal breaks the producer
        # and the next session reads those records again.
        self.refused_values = refused_values
        self.letters: list[Letter] = []
        # Below these offsets a partition was committed once already: a dead letter
        # published again there comes from a replay.
        self.replayed_below = replayed_below
        # The group's committed position at assignment: a record below it is re-read
        # only because the database may have lost its effect (settler.worker.rebalance),
        # and its dead letter is already published.
        self.published_below: dict[TopicPartition, int] = {}

    def dead_letter(self, item: Item, event_kind: str, reason: str, detail: str) -> None:
        """Queue the record for the dead-letter topic; its offset may be committed now,
        since the letter goes out in the transaction that commits past it."""
        record = item.record
        if record.offset < self.published_below.get(item.tp, -1):
            self.offsets.settle(item.tp, record.offset)
            return
        source = f"{item.tp.topic}/{item.tp.partition}/{record.offset}"
        headers = kafka.dead_letter_headers(record.headers, reason, source, detail)
        if record.offset < self.replayed_below.get(item.position.stream, -1):
            headers.append((REPLAY_HEADER, b"1"))
        letter = Letter(item.tp, record.offset, event_kind, reason, detail, record.value,
                        record.key, headers)
        self._fit(letter)
        self.letters.append(letter)
        self.offsets.settle(item.tp, record.offset)

    def _fit(self, letter: Letter) -> None:
        """A letter above the producer's request limit can never be sent: publish it without
        its value (key, headers and the source position stay) and say so."""
        if (letter.tp.topic, letter.tp.partition, letter.offset) in self.refused_values:
            self._omit_value(letter, "the broker refused it before")
            return
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(
            letter.key, letter.value, letter.headers) + REQUEST_OVERHEAD_BYTES
        if size > self.max_request_bytes:
            self._omit_value(letter, f"larger than the producer's limit "
                                     f"({self.max_request_bytes} bytes)")

    def value_refused(self, letter: Letter, error: BaseException) -> None:
        """The broker refused the letter as too large: it goes out again without its value,
        in this session (the transaction is aborted and retried) and in the next."""
        self.refused_values.add((letter.tp.topic, letter.tp.partition, letter.offset))
        self._omit_value(letter, f"the broker refused it: {error}")

    def _omit_value(self, letter: Letter, why: str) -> None:
        if letter.value is None:
            return
        original = len(letter.value)
        letter.value = None
        letter.headers.append((OMITTED_HEADER, str(original).encode()))
        metrics.DLQ_VALUE_OMITTED.inc()
        log.warning("dead letter too large: published without its value", why=why,
                    bytes=original, topic=letter.tp.topic, partition=letter.tp.partition,
                    offset=letter.offset)

    def below(self, positions: dict[TopicPartition, int]) -> list[Letter]:
        """The letters a commit of `positions` must carry: those of the offsets below."""
        return [letter for letter in self.letters
                if letter.offset < positions.get(letter.tp, -1)]

    def published(self, letters: list[Letter]) -> None:
        """Their transaction committed: a read_committed reader sees them now."""
        sent = {id(letter) for letter in letters}
        self.letters = [letter for letter in self.letters if id(letter) not in sent]
        for letter in letters:
            outcome = "conflict" if letter.reason == "conflicting_duplicate" else "invalid"
            metrics.event(letter.event_kind, outcome, letter.reason)
            log.warning("event dead-lettered", reason=letter.reason, detail=letter.detail,
                        topic=letter.tp.topic, partition=letter.tp.partition,
                        offset=letter.offset)

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Revoked: their queued dead letters come back when their records are re-read."""
        self.letters = [letter for letter in self.letters if letter.tp not in partitions]
        for tp in partitions:
            self.published_below.pop(tp, None)
