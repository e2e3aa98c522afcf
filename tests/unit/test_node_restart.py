"""A restarted database node replays its batchlog 30-40 s after it starts (Cassandra's
RING_DELAY, then its 10 s loop), whenever that is: later than the takeover wait, which
counts from the moment the next writer takes the lease.

History ("two crashed writers in a row" across a node restart): writer A's LOGGED batch
for events E is logged by the node, which is then killed (its batchlog entry synced, the
batch not applied) and restarts 12 s later. A's lease lapses meanwhile. The next writer
takes the expired lease once the node answers, waits out the takeover wait (25 s), reads
the rows without E, re-plans E (claims in its epoch) and dies before its own batch
leaves. The node's batchlog then applies A's batch: the rows hold E under A's epoch. The
writer after that finds E claimed by an epoch that never wrote those rows and, without
the restarted-node wait, applies E again.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any
from unittest import mock

import pytest

import settler.worker.takeover as takeover
from tests.unit.sim.run import Scenario
from tests.unit.sim.scripted import ScriptedSimulation, Takeover, logged, record_ids
from tests.unit.simdb import mutations

RESTART_S = 12.0  # the node is down this long (a Cassandra start on a small machine)
REPLAY_AFTER_START_S = 40.0  # RING_DELAY (30 s), then the 10 s loop: its latest first pass


@pytest.fixture(autouse=True)
def _earlier_simulations_collected() -> None:
    gc.collect()


def _history(seed: int) -> tuple[ScriptedSimulation, dict[str, Any]]:
    state: dict[str, Any] = {"armed": False, "ids": None, "first": None, "second": None}
    sim = ScriptedSimulation(Scenario(seed=seed, events=200, partitions=2, produce_over_s=30,
                                      bursts=12, faults=(), duplicate_rate=0.0,
                                      malformed_rate=0.0))

    def on_send(sim: ScriptedSimulation, store: Any, statement: Any) -> Takeover:
        if not logged(statement) or not record_ids(statement):
            return None
        name = sim.worker_named(store.process.name)
        if state["armed"] and state["ids"] is None:
            state["ids"], state["first"] = record_ids(statement), name
            state["after"] = sim.world.now + RESTART_S
            node, late = sim.node, mutations(statement)
            sim.note(f"{store.process.name}: batch of {len(late)} cells logged and synced; "
                     "node killed before applying it")
            node.sync()  # the batchlog entry, and everything before it, is on disk
            node.kill(RESTART_S)
            sim.later(RESTART_S + REPLAY_AFTER_START_S, "the restarted node's batchlog "
                      "replays the batch", lambda: node.db.apply(late))
            return None  # sent to the node that just died: unavailable, retried
        if (state["ids"] and state["second"] is None and sim.world.now > state["after"]
                and record_ids(statement) & state["ids"]):
            # A later session (whichever worker: the same process under a new epoch too).
            state["second"] = name
            sim.note(f"{store.process.name}: killed before its batch carrying them left")
            sim.workers[name].process.kill()
            sim.world.after(5.0, lambda: sim.start_worker(name))
            return asyncio.Event().wait()  # never sent: the process is gone
        return None

    def arm(sim: ScriptedSimulation) -> None:
        state["armed"] = True

    sim.on_send.append(on_send)
    sim.script.append((8.0, arm))
    return sim, state


def _run(seed: int) -> dict[str, Any]:
    sim, state = _history(seed)
    try:
        sim.run()
        sim.check()
    except BaseException:
        print(sim.describe())
        raise
    assert state["second"] is not None, "the history did not happen"
    return state


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_takeover_after_a_node_restart_waits_for_its_batchlog(seed: int) -> None:
    _run(seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_control_without_the_restarted_node_wait_an_event_is_applied_twice(seed: int) -> None:
    """The same history with the restarted-node wait removed fails: what it guards is
    real, and this history reaches it."""
    with mock.patch.dict(takeover.NODE_UPTIME_S, {"cassandra": 0}), \
            pytest.raises(AssertionError, match="rows differ"):
        _run(seed)
