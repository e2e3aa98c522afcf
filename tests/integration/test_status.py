"""`settler status` against the real stack: a writer running, a standby waiting, no worker,
and Kafka down (this stack's own broker, paused)."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest

from settler.core.registry import Registry
from settler.dev import stack as devstack
from settler.ops.sample import MarketShape, Sample, market
from tests import harness

pytestmark = pytest.mark.integration

SHAPE = MarketShape(events=1500, users=80, partitions=harness.PARTITIONS, malformed_rate=0.01,
                    duplicate_rate=0.01, seed=5)
CATCH_UP_S = 120.0
CLI_TIMEOUT_S = 60.0


def status_cli(env: harness.TestEnv, *args: str, **extra_env: str
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "settler", "status", *args],
                          env=env.environ(**extra_env), capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, check=False)


async def status_json(env: harness.TestEnv, *args: str) -> tuple[int, dict[str, Any]]:
    done = await asyncio.to_thread(status_cli, env, "--json", *args)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def url(worker: harness.WorkerProcess) -> str:
    return f"http://127.0.0.1:{worker.metrics_port}"


async def role_of(worker: harness.WorkerProcess, wanted: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, body = await harness.scrape(worker.metrics_port, "/readyz")
            if json.loads(body).get("role") == wanted:
                return
        except OSError:
            pass
        assert worker.proc.poll() is None, worker.tail()
        assert time.monotonic() < deadline, f"never {wanted}:\n{worker.tail()}"
        await asyncio.sleep(0.2)


async def published(env: harness.TestEnv, registry: Registry) -> Sample:
    sample = market(registry, SHAPE)
    await harness.produce(env.topic, sample.records)
    return sample


async def test_a_running_writer_shows_its_lease_offsets_dead_letters_and_rate(
    env: harness.TestEnv, registry: Registry
) -> None:
    sample = await published(env, registry)
    worker = harness.WorkerProcess(env)
    try:
        await harness.wait_caught_up(env, CATCH_UP_S, worker)
        code, doc = await status_json(env, "--metrics", url(worker))
        screen = await asyncio.to_thread(status_cli, env, "--metrics", url(worker))
    finally:
        assert worker.stop() == 0
    assert code == 0 and doc["healthy"] and doc["exit_code"] == 0
    writer = doc["writer"]
    assert f":{worker.proc.pid}:" in writer["owner"] and writer["epoch"] >= 1
    assert writer["live"] and writer["expires_at_ms"] > doc["at_ms"]
    assert writer["ts_ceiling"] > doc["at_ms"] * 1000 - 60_000_000
    ends = {tp.partition: end for tp, end in (await harness.end_offsets(env.topic)).items()}
    assert {p["partition"]: (p["committed"], p["end"], p["lag"]) for p in doc["partitions"]} == {
        p: (end, end, 0) for p, end in ends.items()}
    # A dead letter is published at least once per invalid record (SPEC §4).
    by_reason = Counter(doc["dead_letters"]["by_reason"])
    assert set(by_reason) == set(sample.malformed) and by_reason >= sample.malformed
    assert doc["worker"]["reachable"] and doc["worker"]["role"] == "writer"
    assert doc["worker"]["ready"] is True and doc["worker"]["events_per_s"] > 0
    assert doc["worker"]["settle_p99_s"] > 0
    assert screen.returncode == 0
    for text in (writer["owner"], f"epoch {writer['epoch']}", "lease expires in",
                 "ts_ceiling", "COMMITTED", "role writer  ready", "events/s", "settle p99",
                 "0 records not settled", f"{doc['dead_letters']['total']} in "
                 f"{env.settings.dlq_topic}"):
        assert text in screen.stdout, f"{text!r} not in:\n{screen.stdout}"


async def test_a_standby_says_it_waits_while_the_lease_names_the_writer(
    env: harness.TestEnv, registry: Registry
) -> None:
    await published(env, registry)
    first = harness.WorkerProcess(env, "first")
    try:
        await role_of(first, "writer")
        second = harness.WorkerProcess(env, "second")
        try:
            await role_of(second, "standby")
            code, doc = await status_json(env, "--metrics", url(second))
            screen = await asyncio.to_thread(status_cli, env, "--metrics", url(second))
        finally:
            assert second.stop() == 0
    finally:
        assert first.stop() == 0
    assert code in (0, 1)  # whether the writer has caught up yet is not the point here
    assert f":{first.proc.pid}:" in doc["writer"]["owner"] and doc["writer"]["live"]
    assert doc["worker"]["role"] == "standby" and doc["worker"]["ready"] is True
    assert "role standby  ready" in screen.stdout


async def test_with_no_worker_the_lease_is_released_and_lag_decides_the_exit_code(
    env: harness.TestEnv, registry: Registry
) -> None:
    await published(env, registry)
    await harness.run_until_caught_up(env, CATCH_UP_S)
    more = market(registry, MarketShape(events=50, users=10, partitions=harness.PARTITIONS,
                                        seed=6, first_event_id=10**9, first_trade_id=10**9,
                                        user_offset=50_000))
    await harness.produce(env.topic, more.records)
    idle = f"http://127.0.0.1:{harness.free_port()}"
    code, doc = await status_json(env, "--metrics", idle, "--max-lag", "10")
    assert code == 1 and doc["lag"] == len(more.records) and not doc["healthy"]
    assert doc["writer"]["owner"] is None and not doc["writer"]["live"]
    assert doc["worker"] == {"url": idle, "reachable": False, "error": "connection refused",
                             "role": None, "ready": None, "failing": [],
                             "events_per_s": None, "settle_p99_s": None}
    screen = await asyncio.to_thread(status_cli, env, "--metrics", idle,
                                     "--max-lag", str(len(more.records)))
    assert screen.returncode == 0, screen.stderr
    assert "none: lease released" in screen.stdout
    assert f"no worker answering at {idle} (connection refused)" in screen.stdout


async def test_kafka_down_exits_2_with_one_line_naming_it(env: harness.TestEnv) -> None:
    devstack.pause("kafka")
    try:
        started = time.monotonic()
        done = await asyncio.to_thread(status_cli, env, "--timeout", "3")
        took = time.monotonic() - started
    finally:
        devstack.resume("kafka")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"settler status: Kafka at {harness.BOOTSTRAP} "), done.stderr
    assert took < CLI_TIMEOUT_S / 2


def start_watch(env: harness.TestEnv) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "settler", "status", "--watch", "--json"],
                            env=env.environ(), stdout=subprocess.PIPE, text=True)


async def test_watch_redraws_every_2_s_until_ctrl_c(env: harness.TestEnv) -> None:
    proc = start_watch(env)
    try:
        deadline = time.monotonic() + 30
        screens: list[dict[str, Any]] = []
        assert proc.stdout is not None
        while len(screens) < 3 and time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stdout.readline)
            if line:
                screens.append(json.loads(line))
    finally:
        proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(proc.wait, 15)
    assert len(screens) == 3, screens
    gaps = [b["at_ms"] - a["at_ms"] for a, b in itertools.pairwise(screens)]
    assert all(1900 <= gap < 6000 for gap in gaps), gaps
    assert code == 0

