"""What both sample streams are made of: records that carry what a correct settler must do
with them, the ids they draw from, and the partition Kafka sends a keyed record to.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka.partitioner import murmur2


@dataclass(frozen=True, slots=True)
class SampleRecord:
    key: bytes
    value: bytes
    expect: str | None = None  # a dead-letter reason, or None for a valid event
    duplicate: bool = False  # a re-send of an earlier valid record
    partition: int | None = None  # where it must be published (None: by its key)


@dataclass
class Ids:
    """The next trade and event ids: each one is used once, so a re-send is a duplicate."""

    trade: int
    event: int

    def next_trade(self) -> int:
        self.trade += 1
        return self.trade

    def next_event(self) -> int:
        self.event += 1
        return self.event


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (Java client and aiokafka alike: murmur2 of
    the key, made positive, modulo the count) sends a keyed record to."""
    hashed: int = murmur2(key)
    return (hashed & 0x7FFFFFFF) % partitions
