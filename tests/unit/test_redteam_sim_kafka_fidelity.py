"""Red team, the simulated consumer's fidelity (fixed in tests/unit/sim/kafka.py).

`SimConsumer._fetch` ran at the broker and moved the consumer's position there and then;
its response reached the worker a network latency later, unchecked. aiokafka hands out
buffered records only while their assignment is the active one and their partition's
position is where they were fetched from (FetchResult.check_assignment; seek_to and a
new assignment drop what is buffered), and moves the position only as it hands them
out. Two consequences in the simulation, both impossible with aiokafka:

- a fetch served just before a rebalance was handed to the worker after the revoke
  callback had returned (so `session.revoking` was already False again): the worker
  planned records of the old assignment, then re-read them from the group's commit
  while the first plan was in flight (ReplanInFlight, exit 1). A random seed of
  test_exactly_once_under_faults_that_come_together did this: 772803318
  (pause+db_cut, kafka_freeze+db_freeze, write_errors+add_partition);
- a fetch the client gave up on (Kafka frozen past the request timeout) moved the
  position when the broker served it after the freeze (with no rebalance meanwhile, those
  records would be skipped: never handed out, never tracked).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from aiokafka import TopicPartition

from tests.unit.sim.kafka import SimConsumer, SimKafka, SimRecord
from tests.unit.sim.world import World

TOPIC = "t"


class Listener:
    def __init__(self) -> None:
        self.assigned: list[set[TopicPartition]] = []

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned.append(assigned)


def _setup(seed: int) -> tuple[World, SimKafka, SimConsumer, Any]:
    world = World(random.Random(seed))
    kafka = SimKafka(world, random.Random(seed), TOPIC, "dlq", 1)
    for n in range(40):
        kafka.produce(0, SimRecord(b"k", str(n).encode(), 0))
    process = world.process("w")
    consumer = SimConsumer(kafka, process)
    return world, kafka, consumer, process


@pytest.mark.parametrize("seed", range(30))
def test_a_response_that_arrives_after_a_rebalance_began_is_dropped(seed: int) -> None:
    """The broker serves a fetch and a rebalance begins at once (partitions added); the
    response reaches the client before or after the revoke, or after the new
    assignment. Whatever the order, the client hands out nothing during the rebalance
    and, under the new assignment, the records from the group's commit (0) in order,
    each once."""
    world, kafka, consumer, process = _setup(seed)
    listener = Listener()
    handed: list[tuple[int, bool, list[int]]] = []  # (assignments, rebalancing, offsets)
    fetch = consumer._fetch
    rebalanced: list[bool] = []

    def fetch_then_rebalance(max_records: int) -> Any:
        served = fetch(max_records)
        if served and not rebalanced:
            rebalanced.append(True)
            kafka.group.rebalance("partitions added")
        return served

    consumer._fetch = fetch_then_rebalance  # type: ignore[method-assign]

    async def client() -> None:
        consumer.subscribe([TOPIC], listener)  # type: ignore[arg-type]
        while sum(len(offsets) for _, _, offsets in handed) < 16:
            fetched = await consumer.getmany(timeout_ms=100, max_records=500)
            offsets = [r.offset for records in fetched.values() for r in records]
            if offsets:
                handed.append((len(listener.assigned), consumer.rebalancing, offsets))
        consumer.stopped = True

    task = process.start(client())
    world.run_until(task.done, limit_s=60.0)
    task.result()
    after = [offset for assigned, _, offsets in handed if assigned >= 2 for offset in offsets]
    assert after == list(range(len(after))), (seed, handed)
    assert not any(rebalancing for _, rebalancing, _ in handed), (seed, handed)
