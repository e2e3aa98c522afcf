"""What an operator sees and does, against the real stack (issue 5): metrics that count
every outcome of a run, readiness that follows the database, `settler verify`,
`settler replay` and `settler dlq` on a real settled stream and its real dead letters."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from settler.core.registry import Registry
from settler.dev import stack as devstack
from settler.ops import replay
from settler.ops.sample import SampleRecord, StreamShape, generate
from tests import harness
from tests.model import expected_balances

pytestmark = pytest.mark.integration

SHAPE = StreamShape(events=3000, users=150, duplicate_rate=0.10, malformed_rate=0.03, seed=21)
CATCH_UP_S = 120.0
CLI_TIMEOUT_S = 120.0

# An invalid record that carries a header of its own, to follow through the dead-letter
# topic and back: `settler dlq replay` must restore exactly the original headers.
TRACED = SampleRecord(b"BTC_USDT", b'{"type": "airdrop", "trade_id": 77, "symbol": "BTC_USDT"}',
                      "unknown_type")
TRACED_HEADERS = [("trace-id", b"op-test-1")]


# -- helpers --------------------------------------------------------------------------------


def settler_cli(env: harness.TestEnv, *args: str) -> subprocess.CompletedProcess[str]:
    """`settler ARGS` as an operator runs it, against the test's topic, group and keyspace."""
    return subprocess.run([sys.executable, "-m", "settler", *args], env=env.environ(),
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)


def start_cli(env: harness.TestEnv, *args: str) -> subprocess.Popen[str]:
    """`settler ARGS` left running (its output collected with `communicate()`)."""
    return subprocess.Popen([sys.executable, "-m", "settler", *args], env=env.environ(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def run_cli(env: harness.TestEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(settler_cli, env, *args)


def outcomes(text: str) -> Counter[tuple[str, str]]:
    """settler_events_total summed over event types: (outcome, reason) -> count."""
    counts: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "settler_events_total" and sample.value:
                counts[(sample.labels["outcome"], sample.labels["reason"])] += int(sample.value)
    return counts


def sample_values(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples if sample.name == name
    }


def expected_outcomes(records: list[SampleRecord]) -> Counter[tuple[str, str]]:
    """What settling `records` must count: every distinct valid event settled once, every
    re-send a duplicate, every invalid record under its reason."""
    counts: Counter[tuple[str, str]] = Counter()
    ids: set[tuple[str, int]] = set()
    for record in records:
        if record.expect == "conflicting_duplicate":
            counts[("conflict", record.expect)] += 1
        elif record.expect is not None:
            counts[("invalid", record.expect)] += 1
        elif record.duplicate:
            counts[("duplicate", "")] += 1
        else:
            body = json.loads(record.value)
            is_trade = body["type"] == "trade"
            ids.add(("trade" if is_trade else "balance",
                     body["trade_id"] if is_trade else body["event_id"]))
            counts[("settled", "")] += 1
    assert counts[("settled", "")] == len(ids), "the sample stream re-used an id"
    return counts


async def produce(topic: str, records: list[SampleRecord],
                  headers: list[tuple[str, bytes]] | None = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=harness.BOOTSTRAP, acks="all",
                                enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=r.value, key=r.key, headers=headers)
                   for r in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_record(topic: str, partition: int, offset: int) -> Any:
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(bootstrap_servers=harness.BOOTSTRAP)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, offset)
        record = await asyncio.wait_for(consumer.getone(tp), 30)
    finally:
        await harness.stop_quietly(consumer)
    assert record.offset == offset
    return record


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.25)


async def readyz(worker: harness.WorkerProcess) -> int:
    status, _ = await harness.scrape(worker.metrics_port, "/readyz")
    return status


def valid_records(records: list[SampleRecord]) -> int:
    return sum(1 for r in records if r.expect is None)


# -- one settled stream shared by the tests below --------------------------------------------


@dataclass
class SettledRun:
    env: harness.TestEnv
    records: list[SampleRecord]
    first_half: list[SampleRecord]
    at_half: str  # /metrics once the first half was settled
    during: list[str] = field(default_factory=list)  # /metrics while the second half settled
    after: str = ""
    ends: dict[TopicPartition, int] = field(default_factory=dict)


@pytest.fixture(scope="module")
async def settled(stack: None, registry: Registry, tmp_path_factory: pytest.TempPathFactory
                  ) -> AsyncIterator[SettledRun]:
    """A sample stream with duplicates and malformed records settled by a real worker in
    two halves, with /metrics scraped at the half, while the rest settles, and at the end."""
    env = harness.new_env(tmp_path_factory.mktemp("operations"))
    await harness.create(env)
    try:
        records = generate(registry, SHAPE)
        half = len(records) // 2
        first = [*records[:half], TRACED]
        second = records[half:]
        with harness.running(env) as worker:
            await harness.produce(env.topic, records[:half])
            await produce(env.topic, [TRACED], TRACED_HEADERS)
            await harness.wait_caught_up(env, CATCH_UP_S, worker)
            run = SettledRun(env, [*first, *second], first,
                             (await harness.scrape(worker.metrics_port))[1])
            await harness.produce(env.topic, second)
            catching_up = asyncio.ensure_future(harness.wait_caught_up(env, CATCH_UP_S, worker))
            while not catching_up.done():
                run.during.append((await harness.scrape(worker.metrics_port))[1])
                await asyncio.sleep(0.05)
            await catching_up
            run.after = (await harness.scrape(worker.metrics_port))[1]
            run.ends = await harness.end_offsets(env.topic)
        yield run
    finally:
        await asyncio.wait_for(harness.destroy(env), 120)


# -- metrics --------------------------------------------------------------------------------


async def test_metrics_count_every_outcome_of_a_settlement_run(settled: SettledRun) -> None:
    assert outcomes(settled.at_half) == expected_outcomes(settled.first_half)
    assert outcomes(settled.after) == expected_outcomes(settled.records)
    final = outcomes(settled.after)
    previous: Counter[tuple[str, str]] = outcomes(settled.at_half)
    for text in settled.during:
        seen = outcomes(text)
        assert all(previous[key] <= seen[key] <= final[key] for key in final | seen), (
            "a counter went backwards or past its final value while the run went on")
        previous = seen


async def test_metrics_show_the_run_caught_up_and_idle(settled: SettledRun) -> None:
    text = settled.after
    committed = sample_values(text, "settler_committed_offset")
    assert committed == {
        (("partition", str(tp.partition)), ("topic", tp.topic)): float(end)
        for tp, end in settled.ends.items()
    }
    assert set(sample_values(text, "settler_consumer_lag").values()) == {0.0}
    assert sample_values(text, "settler_batches_in_flight") == {(): 0.0}
    assert sample_values(text, "settler_writer_active") == {(): 1.0}
    assert sample_values(text, "settler_ready") == {(): 1.0}
    settled_events = expected_outcomes(settled.records)[("settled", "")]
    batches = sample_values(text, "settler_batch_seconds_count")[()]
    assert 0 < batches <= settled_events
    assert sample_values(text, "settler_balance_cache_rows")[()] > 0
    assert sample_values(text, "settler_last_settled_event_timestamp_seconds")[()] > 1.6e9
    assert sample_values(text, "settler_last_settled_event_age_seconds")[()] > 0
    retries = sample_values(text, "settler_retries_total")
    assert (("kind", "cql_write"),) in retries, "retry kinds are declared up front"


# -- verify ---------------------------------------------------------------------------------


async def test_verify_finds_no_difference_after_a_run(settled: SettledRun,
                                                      registry: Registry) -> None:
    result = await run_cli(settled.env, "verify")
    rows = len(expected_balances(registry, settled.records))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{rows} rows checked, no difference"
    assert "rows/s" in result.stderr  # the progress line's summary


# -- replay ---------------------------------------------------------------------------------


async def test_replay_is_refused_while_a_worker_of_the_group_runs(settled: SettledRun) -> None:
    with harness.running(settled.env, name="running") as worker:
        await harness.wait_for_log(worker, "partitions assigned", 60)
        result = await run_cli(settled.env, "replay", "--from-offset", "0", "--no-wait")
    assert result.returncode == 1
    assert "active member" in result.stderr
    assert await harness.committed_offsets(settled.env.settings.group_id) == settled.ends


async def test_replay_from_offset_zero_rereads_the_topic_and_changes_no_balance(
    settled: SettledRun,
) -> None:
    env = settled.env
    group = env.settings.group_id

    async def group_empty() -> bool:
        return not (await replay.group_members(env.settings, group))[1]

    await eventually(group_empty, 30, "the group has no member left")
    before = harness.balances(env.settings)
    watcher = start_cli(env, "replay", "--from-offset", "0", "--timeout", "120")
    try:
        async def rewound() -> bool:
            committed = await harness.committed_offsets(group)
            return set(committed) == set(settled.ends) and set(committed.values()) == {0}

        await eventually(rewound, 30, "committed offsets reset to 0")
        with harness.running(env, name="replayed") as worker:
            await harness.wait_caught_up(env, CATCH_UP_S, worker)
            counts = outcomes((await harness.scrape(worker.metrics_port))[1])
        out, err = await asyncio.to_thread(watcher.communicate, timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0, out + err
    assert "caught up" in out
    assert counts[("duplicate", "")] == valid_records(settled.records)
    assert counts[("settled", "")] == 0
    assert harness.balances(env.settings) == before
    verified = await run_cli(env, "verify", "--quiet")
    assert verified.returncode == 0, verified.stdout + verified.stderr


# -- dead letters ---------------------------------------------------------------------------


async def test_dlq_list_shows_every_dead_letter(settled: SettledRun) -> None:
    letters = await harness.dead_letters(settled.env)
    result = await run_cli(settled.env, "dlq", "list", "--limit", "100000", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert listed["total"] == len(letters)
    assert [(d["offset"], d["reason"], d["source"]) for d in listed["letters"]] == [
        (r.offset, harness.header(r, "settler.reason"), harness.header(r, "settler.source"))
        for r in letters
    ]
    table = await run_cli(settled.env, "dlq", "list", "--limit", "3")
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["OFFSET", "REASON", "SOURCE", "KEY", "VALUE"]
    assert len(lines) == 1 + 3 + 1 and lines[-1].startswith(f"3 shown; {len(letters)} in ")


async def test_dlq_show_prints_headers_key_and_the_full_value(settled: SettledRun) -> None:
    traced = await _traced_letter(settled.env)
    result = await run_cli(settled.env, "dlq", "show", str(traced.offset))
    assert result.returncode == 0, result.stderr
    assert "reason    unknown_type" in result.stdout
    assert "trace-id: op-test-1" in result.stdout
    assert f"settler.source: {harness.header(traced, 'settler.source')}" in result.stdout
    assert "key       BTC_USDT" in result.stdout
    assert TRACED.value.decode() in result.stdout.splitlines()


async def test_dlq_replay_republishes_the_original_record(settled: SettledRun) -> None:
    env = settled.env
    traced = await _traced_letter(env)
    dry = await run_cli(env, "dlq", "replay", "--reason", "inexact_cost", "--dry-run")
    inexact = sum(1 for r in await harness.dead_letters(env)
                  if harness.header(r, "settler.reason") == "inexact_cost")
    assert dry.returncode == 0 and len(dry.stdout.splitlines()) == inexact > 0
    assert await harness.end_offsets(env.topic) == settled.ends, "a dry run sent something"

    result = await run_cli(env, "dlq", "replay", str(traced.offset))
    assert result.returncode == 0, result.stderr
    sent = re.search(r"-> (\S+) partition (\d+) offset (\d+)", result.stdout)
    assert sent is not None and sent.group(1) == env.topic, result.stdout
    record = await read_record(env.topic, int(sent.group(2)), int(sent.group(3)))
    assert (record.key, record.value) == (TRACED.key, TRACED.value)
    assert list(record.headers) == TRACED_HEADERS


async def _traced_letter(env: harness.TestEnv) -> Any:
    letters = [r for r in await harness.dead_letters(env) if r.value == TRACED.value]
    assert letters, "the traced record was not dead-lettered"
    return letters[0]


# -- verify finds a changed row (last: it writes behind the worker's back) -------------------


async def test_verify_reports_exactly_a_row_changed_behind_the_workers_back(
    settled: SettledRun, registry: Registry
) -> None:
    env = settled.env
    rows = harness.balances(env.settings)
    (user_id, asset_id), row = sorted(rows.items())[len(rows) // 2]
    # The worker writes with explicit timestamps (its lease's clock): write above them.
    later_us = (time.time_ns() // 1000) + 60_000_000
    _execute(env, "UPDATE user_balances USING TIMESTAMP %s SET available = %s"
                  " WHERE user_id = %s AND asset_id = %s",
             (later_us, row.available + 12345, user_id, asset_id))
    try:
        table = await run_cli(env, "verify")
        document = await run_cli(env, "verify", "--json", "--quiet")
    finally:
        _execute(env, "UPDATE user_balances USING TIMESTAMP %s SET available = %s"
                      " WHERE user_id = %s AND asset_id = %s",
                 (later_us + 1, row.available, user_id, asset_id))
    assert table.returncode == 1 and document.returncode == 1
    report = json.loads(document.stdout)
    (difference,) = report["differences"]
    asset = registry.asset(asset_id)
    assert asset is not None
    assert (difference["user_id"], difference["asset_id"], difference["asset"]) == (
        user_id, asset_id, asset.name)
    assert difference["stored"]["available_raw"] == row.available + 12345
    assert difference["rebuilt"]["available_raw"] == row.available
    assert difference["stored"]["frozen_raw"] == difference["rebuilt"]["frozen_raw"]
    assert difference["stored"]["version"] == difference["rebuilt"]["version"] == row.version
    lines = table.stdout.splitlines()
    assert lines[0].split()[:2] == ["USER", "ASSET"] and len(lines) == 3
    assert lines[1].split()[:2] == [str(user_id), asset.name]
    assert lines[2].startswith(f"1 of {report['rows_checked']} rows differ")


def _execute(env: harness.TestEnv, query: str, parameters: tuple[Any, ...]) -> None:
    from settler.store import cql

    cluster, session = cql.connect(env.settings, keyspace=env.settings.keyspace)
    try:
        session.execute(query, parameters, timeout=30)
    finally:
        cluster.shutdown()


# -- readiness -------------------------------------------------------------------------------


async def test_readyz_is_503_while_cassandra_is_frozen_and_200_after(
    env: harness.TestEnv, registry: Registry
) -> None:
    records = generate(registry, StreamShape(events=600, users=40, seed=5))
    with harness.running(env) as worker:
        await harness.produce(env.topic, records[:300])
        await harness.wait_caught_up(env, CATCH_UP_S, worker)
        assert await readyz(worker) == 200
        devstack.pause("cassandra")
        try:
            # Records to settle make the worker call the database (and find it gone).
            await harness.produce(env.topic, records[300:])

            async def not_ready() -> bool:
                return await readyz(worker) == 503

            await eventually(not_ready, 30, "/readyz says 503 while Cassandra is frozen")
            _, body = await harness.scrape(worker.metrics_port, "/readyz")
            assert json.loads(body)["checks"]["cql"] is False
            assert (await harness.scrape(worker.metrics_port, "/healthz"))[0] == 200
        finally:
            devstack.resume("cassandra")

        async def ready() -> bool:
            return await readyz(worker) == 200

        await eventually(ready, 60, "/readyz says 200 again after Cassandra resumed")
        await harness.wait_caught_up(env, CATCH_UP_S, worker)
    expected = expected_balances(registry, records)
    assert {key: (r.available, r.frozen, r.version)
            for key, r in harness.balances(env.settings).items()} == {
        key: (r.available, r.frozen, r.version) for key, r in expected.items()}
