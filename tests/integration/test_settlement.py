"""Exactly-once settlement against the real Kafka broker and Cassandra node (issue 3), with
the shipped timings unless a test says otherwise (tests/harness.py)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from settler.config import load_settings
from settler.core.registry import Registry
from settler.dev import stack as devstack
from settler.ops.sample import SampleRecord, StreamShape, generate
from settler.worker.takeover import takeover_wait_s
from tests import harness
from tests.model import expected_balances, expected_dead_letters, expected_trade_ids

pytestmark = pytest.mark.integration

FULL = StreamShape(events=20_000, users=200, duplicate_rate=0.10, malformed_rate=0.02, seed=7)
CATCH_UP_S = 300.0
KILLS = 6

SHIPPED = load_settings(environ={})
# A crashed writer's successor must settle again within the documented takeover time:
# the lease lapses (TTL), then the takeover wait; the margin is the new writer joining
# the consumer group and its first commit.
TAKEOVER_WAIT_S = takeover_wait_s("cassandra", SHIPPED.cql_request_timeout_s)  # local stack
TAKEOVER_S = SHIPPED.lease_ttl_s + TAKEOVER_WAIT_S
TAKEOVER_MARGIN_S = 15.0
TAKEOVER_CATCH_UP_S = 120.0  # the rest of the stream once a new writer settles
def assert_settled_exactly(env: harness.TestEnv, registry: Registry,
                           records: list[SampleRecord]) -> None:
    """Balances equal the independent model row by row; the stored trades are exactly the
    valid ones (the primary key makes each stored once; the set says which)."""
    expected = expected_balances(registry, records)
    actual = harness.balances(env.settings)
    assert set(actual) == set(expected), "the set of balance rows differs from the model"
    wrong = {
        key: (actual[key], row)
        for key, row in expected.items()
        if (actual[key].available, actual[key].frozen, actual[key].version)
        != (row.available, row.frozen, row.version)
        or actual[key].updated_at not in row.times
    }
    assert not wrong, f"{len(wrong)} rows differ from the model, e.g. {list(wrong.items())[:3]}"
    stored, wanted = set(harness.trade_ids(env.settings)), expected_trade_ids(records)
    assert stored == wanted, (f"{len(stored - wanted)} unexpected trades stored, e.g. "
                              f"{sorted(stored - wanted)[:5]}; {len(wanted - stored)} missing, "
                              f"e.g. {sorted(wanted - stored)[:5]}")


async def dead_letter_counts(env: harness.TestEnv) -> Counter[tuple[str, bytes, str]]:
    """(source, original value, reason) -> how many dead letters a read_committed
    consumer sees."""
    return Counter(
        (harness.header(r, "settler.source"), bytes(r.value or b""),
         harness.header(r, "settler.reason"))
        for r in await harness.dead_letters(env)
    )


def assert_same_letters(got: Counter[tuple[str, bytes, str]],
                        wanted: Counter[tuple[str, bytes, str]]) -> None:
    extra, missing = got - wanted, wanted - got
    assert got == wanted, (
        f"{extra.total()} dead letters too many, e.g. {list(extra.items())[:3]}; "
        f"{missing.total()} missing, e.g. {list(missing.items())[:3]}")


async def assert_dead_letters(env: harness.TestEnv, records: list[SampleRecord],
                              sources: list[str]) -> None:
    """Exactly one dead letter per invalid record, with its source and reason, and
    nothing else (48 identical undecodable records are 48 dead letters)."""
    assert_same_letters(await dead_letter_counts(env), expected_dead_letters(records, sources))


async def test_stream_with_duplicates_and_malformed_records_settles_exactly(
    env: harness.TestEnv, registry: Registry
) -> None:
    records = generate(registry, FULL)
    sources = await harness.produce(env.topic, records)
    await harness.run_until_caught_up(env, CATCH_UP_S)
    assert_settled_exactly(env, registry, records)
    await assert_dead_letters(env, records, sources)


# -- SIGKILLed workers ----------------------------------------------------------------------


@dataclass
class KilledRun:
    env: harness.TestEnv
    records: list[SampleRecord]
    sources: list[str]
    committed_at_kills: list[int]
    ends: int
    letters: Counter[tuple[str, bytes, str]]


@pytest.fixture(scope="module")
async def killed_run(stack: None, registry: Registry, tmp_path_factory: pytest.TempPathFactory
                     ) -> AsyncIterator[KilledRun]:
    """The full stream settled by workers SIGKILLed six times mid-stream, then one that
    runs to the end. Each is killed once it has settled a random number of events of its
    own: wherever that falls in its pipeline and its commit interval (before its first
    commit too)."""
    env = harness.new_env(tmp_path_factory.mktemp("killed"))
    await harness.create(env)
    try:
        records = generate(registry, FULL)
        sources = await harness.produce(env.topic, records)
        ends = sum((await harness.end_offsets(env.topic)).values())
        rng = random.Random(11)
        committed_at_kills = []
        for _ in range(KILLS):
            worker = harness.WorkerProcess(env, name="killed", **harness.SHORT_TAKEOVER)
            try:
                await harness.wait_for_metric(
                    worker, "settler_events_total", timeout=120,
                    at_least=rng.randint(1, ends // (4 * KILLS)), outcome="settled")
            except BaseException:
                worker.abandon()
                raise
            worker.kill()
            committed_at_kills.append(sum((await harness.committed_offsets(
                env.settings.group_id)).values()))
        await harness.run_until_caught_up(env, CATCH_UP_S, name="final", **harness.SHORT_TAKEOVER)
        yield KilledRun(env, records, sources, committed_at_kills, ends,
                        await dead_letter_counts(env))
    finally:
        await asyncio.wait_for(harness.destroy(env), 120)


async def test_sigkill_at_random_moments_changes_nothing(killed_run: KilledRun,
                                                         registry: Registry) -> None:
    run = killed_run
    assert 0 < run.committed_at_kills[-1] < run.ends, (
        f"the kills did not land mid-stream: committed {run.committed_at_kills} of {run.ends}")
    assert_settled_exactly(run.env, registry, run.records)
    # At least once each, and nothing else: the exact count is the next test.
    assert set(run.letters) == set(expected_dead_letters(run.records, run.sources))


async def test_sigkill_at_random_moments_dead_letters_each_invalid_record_once(
    killed_run: KilledRun,
) -> None:
    assert_same_letters(killed_run.letters,
                        expected_dead_letters(killed_run.records, killed_run.sources))


# -- frozen services -------------------------------------------------------------------------

# What a frozen service must make the worker retry. Cassandra: the lease renewal (every
# third of the TTL) outlives the request timeout; Kafka: the commit of what was settled
# (every commit interval) outlives the commit timeout.
MUST_RETRY = {"cassandra": "cql_lease", "kafka": "kafka_commit"}
# And what a frozen service can never cause: retries of the other one.
NEVER_RETRY = {
    "cassandra": ("kafka_connect", "kafka_fetch", "kafka_commit", "dlq_produce"),
    "kafka": ("cql_connect", "cql_read", "cql_write", "cql_lease"),
}


@dataclass
class FrozenRun:
    env: harness.TestEnv
    records: list[SampleRecord]
    sources: list[str]
    letters: Counter[tuple[str, bytes, str]]
    wrong_kind: dict[str, float]


class FrozenRuns:
    """One run per service, shared by the tests below: the full stream, the service
    frozen mid-stream until the worker has retried what the freeze must make it retry,
    then resumed and the stream settled to the end by the same worker."""

    def __init__(self, registry: Registry, log_dir: Path) -> None:
        self.registry = registry
        self.log_dir = log_dir
        self.runs: dict[str, FrozenRun] = {}
        self.failed: dict[str, BaseException] = {}

    async def get(self, service: str) -> FrozenRun:
        if service in self.failed:
            raise RuntimeError(f"the {service} freeze run failed in an earlier test") from (
                self.failed[service])
        if service not in self.runs:
            env = harness.new_env(self.log_dir / service)
            (self.log_dir / service).mkdir()
            await harness.create(env)
            self.runs[service] = FrozenRun(env, [], [], Counter(), {})
            try:
                await self._run(service, self.runs[service])
            except BaseException as exc:
                self.failed[service] = exc
                raise
        return self.runs[service]

    async def _run(self, service: str, run: FrozenRun) -> None:
        env = run.env
        run.records = generate(self.registry, FULL)
        run.sources = await harness.produce(env.topic, run.records)
        with harness.running(env) as worker:
            done, ends = await harness.wait_for_progress(env, worker)
            devstack.pause(service)
            try:
                assert done < ends, "the stream was settled before the fault"
                await harness.wait_for_metric(worker, "settler_retries_total", timeout=60,
                                              kind=MUST_RETRY[service])
                if service == "cassandra":
                    # The renewal outlived the request timeout, so validity (80% of the
                    # TTL) lapsed before: the session ended and abandoned what hung.
                    assert await harness.metric(worker, "settler_lease_lapses_total") >= 1
                    assert await harness.metric(worker, "settler_writer_sessions_total",
                                                end="lapsed") >= 1
            finally:
                devstack.resume(service)
            await harness.wait_caught_up(env, CATCH_UP_S, worker)
            run.wrong_kind = {
                kind: await harness.metric(worker, "settler_retries_total", kind=kind)
                for kind in NEVER_RETRY[service]
            }
        run.letters = await dead_letter_counts(env)


@pytest.fixture(scope="module")
async def frozen(stack: None, registry: Registry, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[FrozenRuns]:
    runs = FrozenRuns(registry, tmp_path_factory.mktemp("frozen"))
    try:
        yield runs
    finally:
        for run in runs.runs.values():
            await asyncio.wait_for(harness.destroy(run.env), 120)


@pytest.mark.parametrize("service", ["cassandra", "kafka"])
async def test_service_frozen_mid_stream_is_retried_and_loses_nothing(
    frozen: FrozenRuns, registry: Registry, service: str
) -> None:
    run = await frozen.get(service)
    assert not any(run.wrong_kind.values()), (
        f"retries blamed on the wrong service: {run.wrong_kind}")
    assert_settled_exactly(run.env, registry, run.records)
    assert set(run.letters) == set(expected_dead_letters(run.records, run.sources))


@pytest.mark.parametrize("service", [
    "cassandra", "kafka",
])
async def test_service_frozen_mid_stream_dead_letters_each_invalid_record_once(
    frozen: FrozenRuns, service: str
) -> None:
    run = await frozen.get(service)
    assert_same_letters(run.letters, expected_dead_letters(run.records, run.sources))


async def test_replay_from_offset_zero_changes_no_balance(
    env: harness.TestEnv, registry: Registry
) -> None:
    records = generate(registry, FULL)
    await harness.produce(env.topic, records)
    await harness.run_until_caught_up(env, CATCH_UP_S)
    before = harness.balances(env.settings)
    # A fresh consumer group reads the whole topic again from offset 0.
    fresh_group = harness.TestEnv(env.suffix, env.settings.replace(
        group_id=env.settings.group_id + "-r"), env.log_dir)
    await harness.run_until_caught_up(fresh_group, CATCH_UP_S, name="replay")
    assert harness.balances(env.settings) == before
    assert_settled_exactly(env, registry, records)


# -- two workers -----------------------------------------------------------------------------


async def test_two_workers_started_at_once_keep_balances_exact(
    env: harness.TestEnv, registry: Registry
) -> None:
    records = generate(registry, FULL)
    await harness.produce(env.topic, records)
    with harness.running(env, "a") as first, harness.running(env, "b") as second:
        # Rolling deploy: the active one stops mid-stream, the standby takes over.
        done, ends = await harness.wait_for_progress(env, first)
        active, standby = (first, second) if first.logged("writer lease taken") else (
            second, first)
        assert not standby.logged("writer lease taken"), "both workers were writers"
        active.assert_stops_cleanly()
        assert done < ends, "the stream was settled before the active worker stopped"
        await harness.wait_caught_up(env, CATCH_UP_S, standby)
        assert standby.logged("writer lease taken"), "the standby never took over"
    assert_settled_exactly(env, registry, records)


class Supervised:
    """Workers that a supervisor restarts at once when one is SIGKILLed, as a deployment
    does: so the crashed writer comes back as a live standby while its lease expires."""

    def __init__(self, env: harness.TestEnv, count: int) -> None:
        self.env = env
        self.workers = [harness.WorkerProcess(env, f"w{n}") for n in range(count)]

    def writer(self) -> harness.WorkerProcess:
        (writer,) = [w for w in self.workers if w.proc.poll() is None
                     and w.logged("writer lease taken")]
        return writer

    def kill_and_restart(self, worker: harness.WorkerProcess) -> None:
        worker.kill()
        self.workers[self.workers.index(worker)] = harness.WorkerProcess(
            self.env, f"restarted-{self.workers.index(worker)}")

    def stop_all(self, failed: bool) -> None:
        for worker in self.workers:
            if failed:
                worker.abandon()
            elif worker.proc.poll() is None:
                worker.assert_stops_cleanly()


async def settled_by(worker: harness.WorkerProcess) -> float:
    """Events this worker process settled itself (0 until it serves metrics)."""
    if worker.proc.poll() is not None:
        return 0.0
    return await harness.metric_once_served(worker, "settler_events_total", outcome="settled")


async def wait_settling_again(crashed_at: float, workers: Supervised) -> None:
    """Until a worker that was alive after the crash settles events, within the takeover
    time of a crash. (Not the group's committed offsets: the dead writer's last commit
    may land after the kill.)"""
    deadline = crashed_at + TAKEOVER_S + TAKEOVER_MARGIN_S
    while not any([await settled_by(w) for w in workers.workers]):
        if time.monotonic() > deadline:
            tails = "\n".join(w.tail(8) for w in workers.workers)
            raise AssertionError(
                f"nothing settled {TAKEOVER_S + TAKEOVER_MARGIN_S:.0f}s after the writer was "
                f"SIGKILLed (lease TTL {SHIPPED.lease_ttl_s}s + takeover wait "
                f"{TAKEOVER_WAIT_S}s + {TAKEOVER_MARGIN_S:.0f}s):\n{tails}")
        await asyncio.sleep(0.25)


@pytest.mark.timeout(240)
async def test_a_sigkilled_writer_is_replaced_within_the_takeover_time_with_a_live_standby(
    env: harness.TestEnv, registry: Registry
) -> None:
    records = generate(registry, FULL)
    await harness.produce(env.topic, records)
    workers = Supervised(env, 2)
    failed = True
    try:
        await harness.wait_for_progress(env, workers.workers[0])
        for worker in workers.workers:
            await harness.wait_for_log(worker, "writer lease", timeout=30)
        crashed_at = time.monotonic()
        workers.kill_and_restart(workers.writer())
        await wait_settling_again(crashed_at, workers)
        await harness.wait_caught_up(env, TAKEOVER_CATCH_UP_S)
        failed = False
    finally:
        workers.stop_all(failed)
    assert_settled_exactly(env, registry, records)


@pytest.mark.timeout(300)
async def test_a_writer_sigkilled_during_its_takeover_wait_is_replaced_within_the_takeover_time(
    env: harness.TestEnv, registry: Registry
) -> None:
    records = generate(registry, FULL)
    await harness.produce(env.topic, records)
    workers = Supervised(env, 2)
    failed = True
    try:
        await harness.wait_for_progress(env, workers.workers[0])
        for worker in workers.workers:
            await harness.wait_for_log(worker, "writer lease", timeout=30)
        workers.kill_and_restart(workers.writer())
        waiting = await first_to_log(workers, "batches to settle",
                                     timeout=SHIPPED.lease_ttl_s + TAKEOVER_MARGIN_S)
        crashed_at = time.monotonic()
        workers.kill_and_restart(waiting)
        await wait_settling_again(crashed_at, workers)
        await harness.wait_caught_up(env, TAKEOVER_CATCH_UP_S)
        failed = False
    finally:
        workers.stop_all(failed)
    assert_settled_exactly(env, registry, records)


async def first_to_log(workers: Supervised, text: str, timeout: float) -> harness.WorkerProcess:
    deadline = time.monotonic() + timeout
    while not (found := [w for w in workers.workers if w.proc.poll() is None and w.logged(text)]):
        assert time.monotonic() < deadline, f"no worker logged {text!r} within {timeout}s"
        await asyncio.sleep(0.1)
    return found[0]


# -- SIGTERM ---------------------------------------------------------------------------------


async def test_sigterm_while_busy_exits_0_within_its_budget_and_restart_continues(
    env: harness.TestEnv, registry: Registry
) -> None:
    records = generate(registry, FULL)
    await harness.produce(env.topic, records)
    worker = harness.WorkerProcess(env)
    try:
        done, ends = await harness.wait_for_progress(env, worker)
    except BaseException:
        worker.abandon()
        raise
    started = time.monotonic()
    worker.assert_stops_cleanly()  # exit 0 within SHUTDOWN_BUDGET_S + EXIT_MARGIN_S
    took = time.monotonic() - started
    assert done < ends, "the stream was settled before SIGTERM"
    assert took < harness.STOP_TIMEOUT_S
    await harness.run_until_caught_up(env, CATCH_UP_S, name="again")
    assert_settled_exactly(env, registry, records)
