"""Red team, round 3 of the takeover rule (9927fea): the restarted-node wait on a cluster
of several nodes, and what the takeover wait's documentation tells an operator.

FIXED since (all tests below pass): `node_uptimes` now asks every node the driver knows,
as coordinator, for its own time and its own gossip generation (`NODE_CLOCK` on its
system.local), and raises if any does not answer (the caller then waits the whole
bound); the option's help states the `auto` values. What the red team found on 9927fea:

`ProductionStore.node_uptimes` (settler/worker/ports.py:155-175) reads the coordinator's
time, then the nodes' gossip generations from `system_views.gossip_info`, "else" from
`system.local`. ARCHITECTURE.md ("Two crashed writers in a row") promises that the wait
lasts "until every node has been up NODE_UPTIME_S ... or that long if they cannot be
read". Three histories break that on the current code; each is the
tests/unit/test_node_restart.py history (writer a's LOGGED batch logged on node X, X
killed and back 12 s later, its batchlog replaying the batch 40 s after its start; the
next writer takes the expired lease, waits, reads, re-plans the events and dies before
its batch leaves; the writer after that applies them again), with X one node of two: the
coordinator C that answers the system queries has been up for a day.

1. `system_views.gossip_info` times out (a transient error, likely while a node is
   restarting): ports.py:165-171 catch *every* exception as "this server has no such
   table" and fall back to `system.local`, which holds the coordinator's generation only.
   X is not in the list: the restarted-node wait is 0, not the whole bound.
2. A cluster without `system_views.gossip_info` (ScyllaDB, the image docker-compose.yml
   ships, and Cassandra before 4.1): `system.local` is the only source, so a restarted
   node other than the coordinator is never waited for. Not in "Known limits" (which
   covers only a node DOWN at the takeover).
3. With gossip_info read, X's uptime is the COORDINATOR's clock minus X's generation, X's
   clock at its start: a node whose clock is 12 s behind the coordinator's looks 12 s
   older (the skew round 2 removed between worker and node, now between two nodes;
   tolerated: NODE_UPTIME_S - latest replay = 45 - 40 = 5 s).

A control (gossip_info answers both generations, clocks agree) passes.

One fix for the three: ask EVERY node for its own time and generation (`SELECT
toUnixTimestamp(now()), gossip_generation FROM system.local` routed to each host of
`cluster.metadata.all_hosts()`, scylla-driver's `execute(..., host=host)`), uptime = that
node's time minus its own generation; a host that does not answer (or a host count that
does not match) -> the whole bound. At the least: only an InvalidRequest (no such table)
may fall back, and the fallback must cover as many nodes as the driver knows, else wait
the whole bound.

4. settler/config.py:234-240, the option's own help (what `settler` prints for its
   settings), still says "auto: 15 for Cassandra"; auto is 25 (takeover.py:38). An
   operator who sets SETTLER_TAKEOVER_WAIT_S=15 "as auto" gets the wait that
   tests/unit/test_redteam_takeover_rule.py shows applying events twice with 5 s of
   transit; nothing warns about a set value below the derived one (main.py:120-125).

What held (reasoning, file:line; no new test where the suite already has one):
- The abandoned-session wait (role.py:101, 113-128) counts from after `_finish`
  (session.py:175-191): every send precedes `ended` (retry.py:53,66 refuse attempts once
  the session ends; landing.py:67-70 checks validity), then the drain, the Kafka close and
  the rotate LWT, so transit (<= 10 s) + replay (<= 15 s) <= 25 s, with no spare at the
  stated bounds other than that sequence's own duration (the expired-lease path has 2 s).
- SIGTERM with a request that timed out on the driver: the retrier either retries it
  (identical cells and timestamp, landing.py "re-sent, never re-planned": a late copy of
  an acknowledged batch rewrites what is there, and loses to any newer cell) or, once the
  session ends, raises Stopping, which sets `landing.abandoned` (landing.py:84-85), so
  `clean` is False and the lease is not released (role.py:94-98).
- A rotate that times out or lapses ends the hold unreleased (role.py:102-111): the next
  tenure takes its own row back as an expired lease and waits from its sight of it
  (covered by test_redteam_takeover_rule.py section 3).
- Standby reads failing for a while: `_seen` changes only on a successful read
  (lease.py:190-194), so the first sight can only move later than the write it sees.
- The restarted-node query is made once, after the takeover wait (role.py:121-126); a node
  that restarts during the wait is up at the query with a fresh generation; one that is
  down at the query is the known limit.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast
from unittest import mock

import pytest
from cassandra import OperationTimedOut

from settler.config import OPTIONS
from settler.worker.ports import NODE_CLOCK, ProductionStore
from settler.worker.takeover import restarted_node_wait, takeover_wait_s
from tests.unit import test_redteam_takeover_rule as rule
from tests.unit.sim.cassandra import SimStore
from tests.unit.sim.scripted import ScriptedSimulation
from tests.unit.test_redteam_takeover_rule import HistoryMissed, _restart_history

COORDINATOR_START = int(1_700_000_000.0 - 86_400.0)  # C has been up for a day
SEEDS = (0, 1, 2)
# X's batchlog replays at the latest first pass after its start (RING_DELAY 30 s, then the
# 10 s loop), as tests/unit/test_node_restart.py has it: at 35 s the takeover wait alone
# (TTL + 25 s from a first sight after X is back) can end just after the replay.
LATEST_REPLAY_AFTER_START_S = 40.0
X_BEHIND_S = 12.0

# What NODE_CLOCK routed to a host answers: (host, true time now, X's start) -> rows.
Answers = Callable[[str, float, float], Any]


@pytest.fixture(autouse=True)
def _earlier_simulations_collected() -> None:
    gc.collect()


class TwoNodes:
    """A two-node cluster as the driver knows it: C (up for a day) and X, the simulated
    node the history kills and restarts. Used as `self` of the REAL
    `ProductionStore.node_uptimes`."""

    def __init__(self, store: SimStore, answers: Answers) -> None:
        self.store = store
        self.answers = answers
        self.cluster = SimpleNamespace(metadata=SimpleNamespace(all_hosts=lambda: ["C", "X"]))

    async def run_on(self, host: str, statement: str) -> Any:
        await asyncio.sleep(0.002)  # a round trip to that node
        assert statement == NODE_CLOCK, statement
        return self.answers(host, self.store.node.world.now, self.store.node.started_at)


def _both(host: str, now: float, x_start: float) -> list[tuple[int, int]]:
    return [(int(now * 1000), COORDINATOR_START if host == "C" else int(x_start))]


def _x_times_out(host: str, now: float, x_start: float) -> list[tuple[int, int]]:
    if host == "X":
        raise OperationTimedOut("client request timeout")
    return _both(host, now, x_start)


def _x_clock_behind(host: str, now: float, x_start: float) -> list[tuple[int, int]]:
    if host == "X":  # its time and its generation both by its own clock, 12 s behind
        return [(int((now - X_BEHIND_S) * 1000), int(x_start - X_BEHIND_S))]
    return _both(host, now, x_start)


def _run(seed: int, answers: Answers) -> dict[str, Any]:
    """The restart history (no worker clock skew) with `node_uptimes` as the production
    code computes it over the two-node cluster."""
    waits: list[float] = []

    async def node_uptimes(self: SimStore) -> list[float]:
        try:
            uptimes: list[float] = await ProductionStore.node_uptimes(
                cast(Any, TwoNodes(self, answers)))
        except Exception:
            waits.append(await restarted_node_wait("cassandra", _const(None)))
            raise
        waits.append(await restarted_node_wait("cassandra", _const(uptimes)))
        return uptimes

    sim: ScriptedSimulation
    sim, state = _restart_history(seed, 0.0)
    try:
        with mock.patch.object(SimStore, "node_uptimes", node_uptimes), \
                mock.patch.object(rule, "REPLAY_AFTER_START_S", LATEST_REPLAY_AFTER_START_S):
            sim.run()
        if state["second"] is None or state["replayed_at"] is None:
            raise HistoryMissed(f"the history did not happen: {state}")
        state["restarted_waits"] = waits
        sim.note(f"restarted-node waits computed: {waits}")
        sim.check()
    except BaseException:
        print(sim.describe())
        raise
    return state


def _const(uptimes: list[float] | None) -> Callable[[], Any]:
    async def read() -> list[float]:
        if uptimes is None:
            raise LookupError("a node did not answer")
        return uptimes
    return read


@pytest.mark.parametrize("seed", SEEDS)
def test_control_both_nodes_answer_and_the_next_writer_waits_for_the_restarted_one(
        seed: int) -> None:
    """X is not the first node asked: the wait lasts until X is 45 s up, and the next
    writer reads after X's batchlog replayed (40 s after its start)."""
    state = _run(seed, _both)
    assert state["second_at"] > state["replayed_at"]


@pytest.mark.parametrize("seed", SEEDS)
def test_a_node_that_does_not_answer_makes_the_restarted_node_wait_the_whole_bound(
        seed: int) -> None:
    """Failed on 9927fea ('rows differ', 1 to 8 rows): a gossip_info timeout fell back to
    system.local, the coordinator's generation only, and the wait was 0."""
    state = _run(seed, _x_times_out)
    assert state["second_at"] > state["replayed_at"]


@pytest.mark.parametrize("seed", SEEDS)
def test_a_restarted_node_whose_clock_is_behind_the_others_is_still_waited_for(
        seed: int) -> None:
    """Failed on 9927fea ('rows differ'): X's uptime was C's clock minus X's generation
    (X's clock), so X 12 s behind looked 12 s older. Now each node measures its own."""
    state = _run(seed, _x_clock_behind)
    assert state["second_at"] > state["replayed_at"]


# -- the same, without the simulation: what the restarted-node wait comes to -----------------

X_UP_S = 10.0  # X restarted 10 s ago


def _uptime_wait(answers: Answers) -> float:
    now = 1_700_000_000.0
    node = SimpleNamespace(started_at=now - X_UP_S, world=SimpleNamespace(now=now))
    fake = TwoNodes(cast(SimStore, SimpleNamespace(node=node)), answers)

    async def main() -> float:
        async def uptimes() -> list[float]:
            found: list[float] = await ProductionStore.node_uptimes(cast(Any, fake))
            return found
        return await restarted_node_wait("cassandra", uptimes)

    return asyncio.run(main())


def test_control_node_uptimes_wait_for_the_restarted_node() -> None:
    assert _uptime_wait(_both) == pytest.approx(45.0 - X_UP_S, abs=1.0)


def test_a_node_that_does_not_answer_means_the_whole_bound() -> None:
    assert _uptime_wait(_x_times_out) == 45.0


def test_a_node_behind_the_others_measures_its_own_uptime() -> None:
    assert _uptime_wait(_x_clock_behind) == pytest.approx(45.0 - X_UP_S, abs=1.0)


# -- what the takeover wait's own help tells an operator -------------------------------------

def test_the_takeover_wait_option_help_states_the_auto_values() -> None:
    """Failed on 9927fea: the help still said 'auto: 15 for Cassandra'."""
    shipped = int(OPTIONS["cql_request_timeout_s"].default)
    help_text = OPTIONS["takeover_wait_s"].help
    for server, name in (("cassandra", "Cassandra"), ("scylla", "ScyllaDB")):
        assert f"{takeover_wait_s(server, shipped)} for {name}" in help_text, help_text
