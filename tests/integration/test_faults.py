"""Faults injected into the real stack beyond test_settlement's (issue 14): Cassandra
SIGKILLed mid-stream and restarted, SIGTERM while the database is frozen, a worker
SIGKILLed during a replay, and balance rows and ids evicted and reloaded from the
database. Balances must stay exact through each."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from settler.core.registry import Registry
from settler.dev import stack as devstack
from settler.ops.sample import SampleRecord, StreamShape, generate
from settler.worker import SHUTDOWN_BUDGET_S
from tests import harness
from tests.integration.test_settlement import assert_dead_letters, assert_settled_exactly

pytestmark = pytest.mark.integration

SHAPE = StreamShape(events=20_000, users=200, duplicate_rate=0.10, malformed_rate=0.02, seed=17)
CATCH_UP_S = 300.0
BATCHES_IN_FLIGHT_AT_KILL = 8
RESTART_S = 240.0  # Cassandra's start-up on a loaded 2-core machine, commitlog replay included


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


async def test_cassandra_sigkilled_mid_stream_and_restarted_leaves_balances_exact(
    env: harness.TestEnv, registry: Registry
) -> None:
    records = generate(registry, SHAPE)
    sources = await harness.produce(env.topic, records)
    with harness.running(env) as worker:
        done, ends = await harness.wait_for_progress(env, worker)
        # Killed with batches in flight: each either landed or must be sent again.
        await harness.wait_for_metric(worker, "settler_batches_in_flight", timeout=60,
                                      at_least=BATCHES_IN_FLIGHT_AT_KILL)
        pid = devstack.pids()["cassandra"]
        assert pid is not None, "no Cassandra of this stack to kill"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _gone(pid):
            assert time.monotonic() < deadline, f"Cassandra (pid {pid}) survived SIGKILL"
            await asyncio.sleep(0.05)
        assert done < ends, "the stream was settled before the fault"
        # The lease renewal (every third of its TTL) must fail and be retried.
        await harness.wait_for_metric(worker, "settler_retries_total", timeout=60,
                                      kind="cql_lease")
        # Cassandra replays its commitlog and then its batchlog as it starts.
        await asyncio.wait_for(asyncio.to_thread(devstack.up, env.settings, quiet=True),
                               RESTART_S)
        await harness.wait_caught_up(env, CATCH_UP_S, worker)
    # The lease lapsed while the node was down; the next hold waited for the restarted
    # node's batchlog, by the uptime the node itself reports.
    assert worker.logged("waiting until a restarted database node has replayed its batchlog"), (
        worker.tail())
    assert not worker.logged("uptimes not read"), worker.tail()
    assert_settled_exactly(env, registry, records)
    await assert_dead_letters(env, records, sources)


@dataclass
class SigtermRun:
    env: harness.TestEnv
    records: list[SampleRecord]
    sources: list[str]
    exit_code: int
    took: float
    tail: str


# When the SIGTERM comes, Cassandra frozen: while the session still holds a valid lease
# (its reads and batches hang), or once the lease lapsed and the worker is a standby whose
# lease attempts hang (the renewal outlived the request timeout and was retried).
SIGTERM_MOMENTS = ("session", "standby")
STUCK_IN_SESSION_S = 3.0  # well inside the lease's validity (80% of 10 s)


@pytest.fixture(scope="module", params=SIGTERM_MOMENTS)
async def sigterm_while_frozen(request: pytest.FixtureRequest, stack: None,
                               registry: Registry, tmp_path_factory: pytest.TempPathFactory
                               ) -> AsyncIterator[SigtermRun]:
    """Half the stream settled; Cassandra frozen; the other half produced, so the worker
    is stuck on the database; SIGTERM: how long the worker took to exit and with which
    code. Then, Cassandra resumed, a new worker settles the rest, at the shipped timings:
    the frozen lease could not be released, so it waits for it to expire, then the
    takeover wait."""
    moment = request.param
    env = harness.new_env(tmp_path_factory.mktemp(f"sigterm-frozen-{moment}"))
    await harness.create(env)
    try:
        records = generate(registry, SHAPE)
        half = len(records) // 2
        sources = await harness.produce(env.topic, records[:half])
        worker = harness.WorkerProcess(env)
        try:
            await harness.wait_caught_up(env, CATCH_UP_S, worker)
            devstack.pause("cassandra")
            try:
                sources += await harness.produce(env.topic, records[half:])
                if moment == "session":
                    await asyncio.sleep(STUCK_IN_SESSION_S)
                    assert await harness.metric(worker, "settler_lease_valid") == 1, (
                        "the lease lapsed before the SIGTERM")
                else:
                    await harness.wait_for_metric(worker, "settler_retries_total",
                                                  timeout=60, kind="cql_lease")
                    assert await harness.metric(worker, "settler_lease_valid") == 0
                started = time.monotonic()
                # Waited for longer than the budget, so that a failure says how long it took.
                code = worker.stop(timeout=4 * harness.STOP_TIMEOUT_S)
                took = time.monotonic() - started
            finally:
                devstack.resume("cassandra")
        except BaseException:
            worker.abandon()
            raise
        await harness.run_until_caught_up(env, CATCH_UP_S, name="restarted")
        yield SigtermRun(env, records, sources, code, took, worker.tail())
    finally:
        await asyncio.wait_for(harness.destroy(env), 120)


async def test_sigterm_while_cassandra_is_frozen_exits_0_within_its_budget(
    sigterm_while_frozen: SigtermRun,
) -> None:
    run = sigterm_while_frozen
    assert run.exit_code == 0, f"exit code {run.exit_code} on SIGTERM:\n{run.tail}"
    assert run.took < harness.STOP_TIMEOUT_S, (
        f"SIGTERM took {run.took:.1f}s with Cassandra frozen; the budget is "
        f"{SHUTDOWN_BUDGET_S}s (+{harness.EXIT_MARGIN_S}s):\n{run.tail}")


async def test_sigterm_while_cassandra_is_frozen_loses_nothing(
    sigterm_while_frozen: SigtermRun, registry: Registry
) -> None:
    run = sigterm_while_frozen
    assert_settled_exactly(run.env, registry, run.records)
    await assert_dead_letters(run.env, run.records, run.sources)


def _settler(env: harness.TestEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "settler", *args], env=env.environ(),
                          capture_output=True, text=True, timeout=120, check=False)


async def test_a_worker_sigkilled_during_a_replay_changes_no_balance(
    env: harness.TestEnv, registry: Registry
) -> None:
    records = generate(registry, SHAPE)
    await harness.produce(env.topic, records)
    await harness.run_until_caught_up(env, CATCH_UP_S)
    before = harness.balances(env.settings)
    ends = sum((await harness.end_offsets(env.topic)).values())
    rewound = await asyncio.to_thread(_settler, env, "replay", "--from-offset", "0",
                                      "--no-wait")
    assert rewound.returncode == 0, rewound.stdout + rewound.stderr
    assert await harness.committed_offsets(env.settings.group_id) == dict.fromkeys(
        await harness.end_offsets(env.topic), 0)

    worker = harness.WorkerProcess(env, name="replaying", **harness.SHORT_TAKEOVER)
    try:
        # Placed on the worker's own count of replayed events: its commits come in jumps
        # (every 500 ms at ~8,000 duplicates/s), and one jump could pass the whole topic.
        target = random.Random(5).randint(1, ends // 4)
        await harness.wait_for_metric(worker, "settler_events_total", timeout=120,
                                      at_least=target, outcome="duplicate")
    except BaseException:
        worker.abandon()
        raise
    worker.kill()
    at_kill = sum((await harness.committed_offsets(env.settings.group_id)).values())
    assert at_kill < ends, f"the kill did not land mid-replay: {at_kill} of {ends} committed"

    with harness.running(env, name="after-kill", **harness.SHORT_TAKEOVER) as worker:
        await harness.wait_caught_up(env, CATCH_UP_S, worker)
        settled = await harness.metric(worker, "settler_events_total", outcome="settled")
    assert harness.balances(env.settings) == before
    assert_settled_exactly(env, registry, records)
    assert settled == 0, f"{settled} events settled anew by a replay"


# Bounds far below what the stream touches (200 users x 3 assets, about 4,500 ids),
# so rows and ids are evicted and read back from the database over and over. Memory also
# holds the rows of the fetch being planned and of the batches in flight (never evicted),
# so small fetches and few small batches in flight keep it close to the bounds.
SMALL_MEMORY = {
    "SETTLER_BALANCE_CACHE_ROWS": "30",
    "SETTLER_RECENT_IDS": "100",
    "SETTLER_FETCH_MAX_RECORDS": "20",
    "SETTLER_BATCH_EVENTS": "4",
    "SETTLER_MAX_IN_FLIGHT": "2",
}
EVICTING = StreamShape(events=6000, users=200, duplicate_rate=0.10, malformed_rate=0.02, seed=19)


async def test_rows_and_ids_evicted_and_reloaded_from_the_database_settle_exactly(
    env: harness.TestEnv, registry: Registry
) -> None:
    records = generate(registry, EVICTING)
    sources = await harness.produce(env.topic, records)
    peak = {"settler_balance_cache_rows": 0.0, "settler_remembered_ids": 0.0}
    with harness.running(env, **SMALL_MEMORY) as worker:
        await harness.wait_for_log(worker, "worker starting", 60)  # metrics are served
        catching_up = asyncio.ensure_future(harness.wait_caught_up(env, CATCH_UP_S, worker))
        while not catching_up.done():
            for gauge in peak:
                peak[gauge] = max(peak[gauge], await harness.metric(worker, gauge))
            await asyncio.sleep(0.1)
        await catching_up
        duplicates = await harness.metric(worker, "settler_events_total", outcome="duplicate")
    assert_settled_exactly(env, registry, records)
    await assert_dead_letters(env, records, sources)
    # Most re-sent ids were evicted long before their copy came: found in the database.
    assert duplicates == sum(1 for r in records if r.duplicate)
    rows = len(harness.balances(env.settings))
    ids = sum(1 for r in records if r.expect is None and not r.duplicate)
    # Never more than half of them in memory at once: the rest were evicted, and read
    # back from the database whenever their user or id came again.
    assert 0 < peak["settler_balance_cache_rows"] < rows / 2, (peak, rows)
    assert 0 < peak["settler_remembered_ids"] < ids / 2, (peak, ids)
