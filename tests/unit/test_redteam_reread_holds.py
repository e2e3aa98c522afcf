"""Red team, the re-read window on ONE node: histories tried against the new rule
("each partition starts at the lower of the group's commit and the database's record of
it") that it survives. Kept as regression tests; the ones it does not survive are in
tests/unit/test_redteam_reread.py.

Each history places a Cassandra SIGKILL (the node reverts to its last periodic
commitlog sync, replays what it had logged 30-40 s after restarting) at a chosen moment
by hooks on what the workers send, then checks balances, records and dead letters
(`Simulation.check`), and that the database's record of the commit caught up with
Kafka's (`Simulation.caught_up`, which the run waits for).
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from settler import metrics
from settler.store.batches import Batch
from tests.unit.sim.run import Scenario
from tests.unit.sim.scripted import ScriptedSimulation, Takeover, logged, record_ids


@pytest.fixture(autouse=True)
def _earlier_simulations_collected() -> None:
    gc.collect()


def _progress(sim: ScriptedSimulation) -> dict[str, dict[str, int]]:
    rows: dict[str, dict[str, int]] = {"committed": {}, "frontier": {}, "resolved": {}}
    for name, stream, position, epoch in sim.node.db.select("progress", ("writer",)):
        rows[name][stream or "epoch"] = position if stream else epoch
    return rows


def _rereads() -> float:
    return sum(sample.value for metric in metrics.REREAD.collect()
               for sample in metric.samples if sample.name.endswith("_total"))


def _run(sim: ScriptedSimulation, state: dict[str, Any]) -> None:
    before = _rereads()
    try:
        sim.run()
        assert state.get("kills", 0) == sim.node.kills > 0, "the history did not happen"
        assert _rereads() > before, "no session started below the group's commit"
        sim.check()
        assert sim.caught_up()
    except BaseException:
        print(sim.describe())
        raise


def _quiet_then_killed(seed: int, partitions: int) -> tuple[ScriptedSimulation, dict[str, Any]]:
    """Everything is produced in the first 8 s; the node syncs at 4 s and is killed at
    20 s, when every partition is idle: the progress records of the last commits are
    lost with the effects, and no new record ever arrives to move the commit on."""
    state: dict[str, Any] = {"kills": 0}
    sim = ScriptedSimulation(Scenario(seed=seed, events=150, partitions=partitions,
                                      produce_over_s=8, bursts=6, faults=(),
                                      malformed_rate=0.1, duplicate_rate=0.1,
                                      cross_copies=5))
    node = sim.node
    node.start_commitlog_sync = lambda: node.sync()  # type: ignore[method-assign]

    def sync(sim: ScriptedSimulation) -> None:
        sim.note("commitlog synced")
        node.sync()

    def kill(sim: ScriptedSimulation) -> None:
        state["before"] = _progress(sim)
        state["kills"] += 1
        sim.note("node killed, back in 15 s")
        node.kill(15.0)

    stop_all = sim.stop_all

    def look_then_stop() -> None:
        # What the database says once caught up, before the clean stops resolve more.
        if "after" not in state:
            state["after"] = _progress(sim)
            state["epoch"] = node.lease["epoch"] if node.lease else None
        stop_all()

    sim.stop_all = look_then_stop  # type: ignore[method-assign]
    sim.script += [(4.0, sync), (20.0, kill)]
    return sim, state


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("partitions", [1, 3])
def test_idle_partitions_catch_up_and_resolve_after_a_kill(seed: int, partitions: int) -> None:
    """No record arrives after the kill: the session re-reads each window, the database's
    record catches up with Kafka's commit, and the session resolves its epoch (rows keep
    one lineage entry) without any new record."""
    sim, state = _quiet_then_killed(seed, partitions)
    _run(sim, state)
    after = state["after"]
    committed = {f"{tp.topic}:{tp.partition}": offset
                 for tp, offset in sim.kafka.committed.items() if offset > 0}
    assert all(after["committed"].get(stream, -1) >= offset
               for stream, offset in committed.items()), (after, committed)
    assert after["resolved"].get("epoch") == state["epoch"], (after, state["epoch"])


def _second_kill_in_the_window(seed: int, *, sync_between: bool
                               ) -> tuple[ScriptedSimulation, dict[str, Any]]:
    """A first kill loses a tail; once the next writer is re-reading the window (its
    first settlement batch), the node syncs (or not) and is killed again 0.3 s later."""
    state: dict[str, Any] = {"kills": 0, "restarted_at": None, "second": False}
    sim = ScriptedSimulation(Scenario(seed=seed, events=240, partitions=2, produce_over_s=40,
                                      bursts=20, faults=(), malformed_rate=0.1,
                                      duplicate_rate=0.1, cross_copies=5, batch_events=4))
    node = sim.node

    def first_kill(sim: ScriptedSimulation) -> None:
        state["kills"] += 1
        state["restarted_at"] = sim.world.now + 15.0
        sim.note("node killed, back in 15 s")
        node.kill(15.0)

    def on_send(sim: ScriptedSimulation, store: Any, statement: Any) -> Takeover:
        if (state["restarted_at"] is not None and not state["second"]
                and sim.world.now > state["restarted_at"] and logged(statement)
                and record_ids(statement)):
            state["second"] = True
            if sync_between:
                node.sync()
            sim.note("the re-read's first batch is sent; node killed again in 0.3 s")

            def again() -> None:
                state["kills"] += 1
                node.kill(20.0)

            sim.later(0.3, "node killed again, back in 20 s", again)
        return None

    sim.on_send.append(on_send)
    sim.script.append((14.0, first_kill))
    return sim, state


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sync_between", [False, True])
def test_a_second_kill_while_the_window_is_reread(seed: int, sync_between: bool) -> None:
    sim, state = _second_kill_in_the_window(seed, sync_between=sync_between)
    _run(sim, state)
    assert state["second"]


def _partition_added_in_the_window(seed: int) -> tuple[ScriptedSimulation, dict[str, Any]]:
    """A partition is added (eager rebalance: every partition revoked and reassigned)
    while the next writer re-reads the window a kill opened."""
    state: dict[str, Any] = {"kills": 0, "restarted_at": None, "added": False}
    sim = ScriptedSimulation(Scenario(seed=seed, events=240, partitions=2, produce_over_s=50,
                                      bursts=25, faults=(), malformed_rate=0.1,
                                      duplicate_rate=0.1, cross_copies=5, batch_events=4))
    node = sim.node

    def kill(sim: ScriptedSimulation) -> None:
        state["kills"] += 1
        state["restarted_at"] = sim.world.now + 15.0
        node.kill(15.0)

    def on_send(sim: ScriptedSimulation, store: Any, statement: Any) -> Takeover:
        if (state["restarted_at"] is not None and not state["added"]
                and sim.world.now > state["restarted_at"] and logged(statement)
                and record_ids(statement)):
            state["added"] = True
            sim.later(0.01, "a partition is added mid-window", sim.kafka.add_partition)
        return None

    sim.on_send.append(on_send)
    sim.script.append((12.0, kill))
    return sim, state


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_rebalance_in_the_middle_of_the_reread_window(seed: int) -> None:
    sim, state = _partition_added_in_the_window(seed)
    _run(sim, state)
    assert state["added"]


def _killed_before_its_progress_record(seed: int) -> tuple[ScriptedSimulation, dict[str, Any]]:
    """No database loss: the writer dies after its Kafka commit and before the progress
    record of it (the window is one commit interval of complete events)."""
    state: dict[str, Any] = {"kills": 0, "dead": None}
    sim = ScriptedSimulation(Scenario(seed=seed, events=240, partitions=2, produce_over_s=40,
                                      bursts=30, faults=(), malformed_rate=0.1,
                                      duplicate_rate=0.1, cross_copies=5, batch_events=4))

    def on_send(sim: ScriptedSimulation, store: Any, statement: Any) -> Takeover:
        if (state["dead"] is None and sim.world.now > 10 and isinstance(statement, Batch)
                and any(name == "write_progress" and p[1] == "committed"
                        for name, p in statement.statements)):
            name = sim.worker_named(store.process.name)
            state["dead"] = name
            sim.workers[name].process.kill()
            sim.world.after(5.0, lambda: sim.start_worker(name))
            sim.note(f"{store.process.name} killed before its progress record")
            # A kill of the node 1 s later that loses nothing acknowledged since the
            # record (it syncs first) checks the takeover after a node restart too.
            sim.later(1.0, "node synced and killed", lambda: (sim.node.sync(),
                                                              sim.node.kill(12.0)))
            state["kills"] += 1
            return asyncio.Event().wait()
        return None

    sim.on_send.append(on_send)
    return sim, state


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_crash_between_the_kafka_commit_and_the_progress_record(seed: int) -> None:
    sim, state = _killed_before_its_progress_record(seed)
    _run(sim, state)


@pytest.mark.parametrize("seed", [0, 2, 4])  # seeds whose kill at 20 s loses a tail
def test_replay_after_a_database_kill(seed: int) -> None:
    """A kill loses a tail, the workers catch up; then `settler replay --from-offset 0`
    (the group rewound, the database's record raised to where it was) re-reads all."""
    state: dict[str, Any] = {"kills": 0}
    sim = ScriptedSimulation(Scenario(seed=seed, events=200, partitions=2, produce_over_s=30,
                                      bursts=12, faults=(), malformed_rate=0.1,
                                      duplicate_rate=0.1, cross_copies=5, replay=True))

    def kill(sim: ScriptedSimulation) -> None:
        state["kills"] += 1
        sim.node.kill(15.0)

    sim.script.append((20.0, kill))
    _run(sim, state)
    assert sim.node.lost_on_kill > 0
