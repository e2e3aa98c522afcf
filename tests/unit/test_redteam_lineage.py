"""Red team, resolved epochs: "rows need lineage only for epochs that may still hold an
unfinished event ... usually one lineage entry, whatever the number of input
partitions". A session records `resolved` only once it has committed past the frontier
it found at its start on EVERY input partition (`ProgressRecorder.record`,
`resolve_at_clean_end`), and it counts as committed only what it committed itself
(`ProgressRecorder.committed`, filled by its own transactions). A partition that receives no
record during the session is never committed by it, so no session resolves while any
partition is idle, however complete everything is. Each writer session (every deploy,
takeover, rotation) then adds one lineage entry to every row it writes, for ever: the
rows grow with the number of sessions, the batch bound (which counts two entries a row)
underestimates, batches are split, and at last one event's rows alone exceed the
database's batch_size_fail_threshold: every worker exits 1 on that event, for good.

Production numbers: with Cassandra's 50 KiB threshold, a trade touching 6 rows reaches
it after roughly 500 sessions (about 24 bytes a lineage entry); here the threshold is
1500 bytes, as in tests/unit/test_simulation.py's split test, to get there in 20.
"""

from __future__ import annotations

import gc

import pytest
from aiokafka import TopicPartition

from tests.unit.sim.kafka import SimRecord
from tests.unit.sim.run import TOPIC, Scenario
from tests.unit.sim.scripted import ScriptedSimulation, restart_when_exited, stop
from tests.unit.simdb import SimDb


@pytest.fixture(autouse=True)
def _earlier_simulations_collected() -> None:
    """Coroutines of simulated processes killed by earlier tests are finalized now, not
    while pytest parses source to report a failure (CPython 3.11 then raises SystemError:
    AST constructor recursion depth mismatch, an INTERNALERROR)."""
    gc.collect()



class OneQuietPartition(ScriptedSimulation):
    """The stream at an even pace; the first `on_partition_1` records go to partition 1,
    every later one to partition 0 (a market, or a user range, that went quiet)."""

    on_partition_1 = 3

    def engine(self) -> None:
        pace = self.scenario.produce_over_s / len(self.records)
        for index, record in enumerate(self.records):
            partition = 1 if index < self.on_partition_1 else 0

            def publish(record: object = record, partition: int = partition) -> None:
                tp = TopicPartition(TOPIC, partition)
                self.positions[(partition, len(self.kafka.logs[tp]))] = record  # type: ignore[assignment]
                self.kafka.produce(partition, SimRecord(record.key, record.value,  # type: ignore[attr-defined]
                                                        int(self.world.now * 1000)))

            self.world.at(self.world.now + 0.5 + index * pace, publish)


def hand_overs(sim: ScriptedSimulation, count: int, every_s: float) -> None:
    """SIGTERM the writer every `every_s` (a deploy): it drains, commits, releases the
    lease and restarts as the standby; the standby takes over at once."""
    def term(sim: ScriptedSimulation) -> None:
        for name, run in sorted(sim.workers.items()):
            if run.process.alive and not run.task.done() and (
                    run.worker.health.role == "writer"):
                sim.note(f"SIGTERM {name}")
                stop(sim, name)
                restart_when_exited(sim, name, 1.0)
                return

    for index in range(count):
        sim.script.append((8.0 + index * every_s, term))


def lineage_entries(db: SimDb) -> int:
    return max(len(row["lineage"][1]) for partition in db.tables["user_balances"].values()
               for row in partition.values())


def _run(sim: ScriptedSimulation) -> None:
    try:
        sim.run()
        sim.check()
    except BaseException:
        print(sim.describe())
        raise


def test_rows_keep_one_lineage_entry_while_a_partition_is_quiet() -> None:
    """Fails today: after 10 clean hand-overs each row has 10 entries (with records on
    both partitions throughout, the same history leaves 1)."""
    sim = OneQuietPartition(Scenario(seed=1, events=300, users=4, partitions=2,
                                     produce_over_s=120, faults=(), duplicate_rate=0.0,
                                     malformed_rate=0.0))
    hand_overs(sim, 10, 11.0)
    _run(sim)
    sessions = sim.node.lease["epoch"] if sim.node.lease else 0
    assert sessions >= 6, "the history did not happen"
    assert lineage_entries(sim.node.db) <= 2, (
        f"rows carry {lineage_entries(sim.node.db)} lineage entries after {sessions} "
        "writer sessions")


def test_a_quiet_partition_does_not_end_settlement_by_batch_size() -> None:
    """Fails today: after about 12 hand-overs one trade's rows alone are too large a
    batch: both workers exit 1 ('one event alone is a batch too large')."""
    sim = OneQuietPartition(Scenario(seed=1, events=400, users=4, partitions=2,
                                     produce_over_s=250, faults=(), duplicate_rate=0.0,
                                     malformed_rate=0.0, fail_threshold_bytes=1500,
                                     batch_events=4))
    hand_overs(sim, 20, 11.0)
    _run(sim)


def test_control_with_records_on_every_partition_rows_keep_one_entry() -> None:
    """Passes: the same hand-overs with records on both partitions all along."""
    sim = OneQuietPartition(Scenario(seed=1, events=300, users=4, partitions=2,
                                     produce_over_s=120, faults=(), duplicate_rate=0.0,
                                     malformed_rate=0.0))
    sim.on_partition_1 = 0
    sim.engine = lambda: ScriptedSimulation.engine(sim)  # type: ignore[method-assign]
    hand_overs(sim, 10, 11.0)
    _run(sim)
    assert len({partition for partition, _ in sim.positions}) == 2
    assert lineage_entries(sim.node.db) == 1
