"""Exactly-once settlement against the real Kafka broker and Cassandra node (issue 3)."""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter

import pytest

from settler.core.registry import Registry
from settler.dev import stack as devstack
from settler.ops.sample import SampleRecord, StreamShape, generate
from tests import harness
from tests.model import expected_balances

pytestmark = pytest.mark.integration

FULL = StreamShape(events=20_000, users=200, duplicate_rate=0.10, malformed_rate=0.02, seed=7)
CATCH_UP_S = 300.0


def assert_settled_exactly(env: harness.TestEnv, registry: Registry,
                           records: list[SampleRecord]) -> None:
    """Balances equal the independent model row by row; each trade is stored once."""
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
    ids = harness.trade_ids(env.settings)
    valid_trades = {r.value for r in records if r.expect is None and b'"trade"' in r.value}
    assert len(ids) == len(set(ids)) == len(valid_trades)


async def assert_dead_letters(env: harness.TestEnv, records: list[SampleRecord]) -> None:
    """Every malformed record is in the dead-letter topic with its reason, once or more
    (a dead letter is produced at least once), and nothing else is."""
    letters = await harness.dead_letters(env)
    got = Counter((bytes(r.value or b""), harness.header(r, "settler.reason")) for r in letters)
    wanted = Counter((r.value, r.expect) for r in records if r.expect is not None)
    assert set(got) == set(wanted)
    assert all(harness.header(r, "settler.source").startswith(env.topic) for r in letters)


async def test_stream_with_duplicates_and_malformed_records_settles_exactly(
    env: harness.TestEnv, registry: Registry
) -> None:
    records = generate(registry, FULL)
    await harness.produce(env.topic, records)
    await harness.run_until_caught_up(env, CATCH_UP_S)
    assert_settled_exactly(env, registry, records)
    await assert_dead_letters(env, records)


async def test_sigkill_at_random_moments_changes_nothing(
    env: harness.TestEnv, registry: Registry
) -> None:
    records = generate(registry, FULL)
    await harness.produce(env.topic, records)
    ends = sum((await harness.end_offsets(env.topic)).values())
    rng = random.Random(11)
    progress_at_kills = []
    for _ in range(6):
        worker = harness.WorkerProcess(env, name="killed")
        await harness.wait_for_log(worker, "partitions assigned", timeout=60)
        await asyncio.sleep(rng.uniform(0.2, 1.5))
        worker.kill()
        progress_at_kills.append(sum((await harness.committed_offsets(
            env.settings.group_id)).values()))
    assert any(0 < done < ends for done in progress_at_kills), (
        f"no kill landed mid-stream: committed {progress_at_kills} of {ends}")
    await harness.run_until_caught_up(env, CATCH_UP_S, name="final")
    assert_settled_exactly(env, registry, records)
    await assert_dead_letters(env, records)


@pytest.mark.parametrize("service", ["cassandra", "kafka"])
async def test_service_frozen_for_20s_mid_stream_loses_nothing(
    env: harness.TestEnv, registry: Registry, service: str
) -> None:
    records = generate(registry, FULL)
    await harness.produce(env.topic, records)
    worker = harness.WorkerProcess(env)
    try:
        done, ends = await harness.wait_for_progress(env, worker)
        devstack.pause(service)
        assert done < ends, "the stream was settled before the fault"
        try:
            await asyncio.sleep(20)
            assert worker.proc.poll() is None, f"the worker exited while {service} was down"
            retries = await harness.metric(worker, "settler_retries_total")
        finally:
            devstack.resume(service)
        assert retries > 0, f"no retry counted while {service} was down"
        await harness.wait_caught_up(env, CATCH_UP_S, worker)
    finally:
        assert worker.stop() == 0
    assert_settled_exactly(env, registry, records)
    await assert_dead_letters(env, records)


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


async def test_two_workers_started_at_once_keep_balances_exact(
    env: harness.TestEnv, registry: Registry
) -> None:
    records = generate(registry, FULL)
    await harness.produce(env.topic, records)
    first, second = harness.WorkerProcess(env, "a"), harness.WorkerProcess(env, "b")
    try:
        # Rolling deploy: the active one stops mid-stream, the standby takes over.
        done, ends = await harness.wait_for_progress(env, first)
        active, standby = (first, second) if first.logged("writer lease taken") else (
            second, first)
        assert not standby.logged("writer lease taken"), "both workers were writers"
        assert active.stop() == 0
        assert done < ends, "the stream was settled before the active worker stopped"
        await harness.wait_caught_up(env, CATCH_UP_S, standby)
        assert standby.logged("writer lease taken"), "the standby never took over"
    finally:
        for worker in (first, second):
            if worker.proc.poll() is None:
                assert worker.stop() == 0
    assert_settled_exactly(env, registry, records)


async def test_sigterm_while_busy_exits_0_within_10s_and_restart_continues(
    env: harness.TestEnv, registry: Registry
) -> None:
    records = generate(registry, FULL)
    await harness.produce(env.topic, records)
    worker = harness.WorkerProcess(env)
    done, ends = await harness.wait_for_progress(env, worker)
    loop = asyncio.get_running_loop()
    started = loop.time()
    worker.signal(signal.SIGTERM)
    assert done < ends, "the stream was settled before SIGTERM"
    code = await asyncio.to_thread(worker.proc.wait, 10)
    assert code == 0 and loop.time() - started < 10
    await harness.run_until_caught_up(env, CATCH_UP_S, name="again")
    assert_settled_exactly(env, registry, records)
