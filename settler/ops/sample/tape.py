"""The market stream as it is written: the seeded random source, ids and clock every record
draws from, each record placed on the partition Kafka will send it to, and the counts the
summary reports. Holds what faults.py needs to make invalid records (a FaultSource).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace

from settler.core.registry import Symbol
from settler.ops.sample.records import Ids, SampleRecord, partition_of


@dataclass
class Tape:
    rng: random.Random
    ids: Ids
    partitions: int
    users: list[int]
    symbols: list[Symbol]
    clock: int = 1_700_000_000_000
    records: list[SampleRecord] = field(default_factory=list)
    valid: list[SampleRecord] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)  # valid records by type
    malformed: Counter[str] = field(default_factory=Counter)  # invalid records by reason
    duplicates: int = 0

    def user(self) -> int:
        return self.rng.choice(self.users)

    def tick(self) -> int:
        self.clock += self.rng.randint(1, 50)
        return self.clock

    def emit(self, record: SampleRecord) -> None:
        partition = partition_of(record.key, self.partitions)
        self.records.append(replace(record, partition=partition))
        if record.expect is None and not record.duplicate:
            self.valid.append(self.records[-1])
