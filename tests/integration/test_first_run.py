"""`make run`'s path, headless, on the real stack: `settler sample --worker` starts the
worker, publishes the sample, prints the summary once it is settled and keeps the worker
running until interrupted. The sample must settle with no balance anomaly and leave every
balance non-negative, whatever the worker's interleaving of partitions was."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from settler.store.schema import apply_schema
from settler.worker import SHUTDOWN_BUDGET_S
from tests import harness

pytestmark = pytest.mark.integration

SUMMARY_TIMEOUT_S = 240.0


@pytest.fixture(params=[3, 4], ids=["3-partitions", "4-partitions"])
async def first_run_env(stack: None, tmp_path: Path, request: pytest.FixtureRequest
                        ) -> AsyncIterator[harness.TestEnv]:
    """A test's own topic (3 partitions: both symbols share one; 4: each has its own),
    dead-letter topic, group and keyspace."""
    env = harness.new_env(tmp_path)
    admin = AIOKafkaAdminClient(bootstrap_servers=harness.BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(env.topic, request.param, 1),
                                   NewTopic(env.settings.dlq_topic, 1, 1)])
    finally:
        await admin.close()
    await asyncio.to_thread(apply_schema, env.settings)
    try:
        yield env
    finally:
        await asyncio.wait_for(harness.destroy(env), 120)


class Lines:
    """A process's stdout, line by line, read on a thread so waits have deadlines."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(text in line for line in self.lines):
                left = deadline - time.monotonic()
                assert left > 0, f"{text!r} not printed within {timeout}s:\n{self.text}"
                self._changed.wait(left)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def start_make_run(environ: dict[str, str], log: IO[bytes]) -> subprocess.Popen[str]:
    """What `make run` runs (Makefile), smaller, with the worker's logs going to `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "settler", "sample", "--events", "3000", "--users", "150",
         "--duplicates", "0.01", "--malformed", "0.003", "--worker"],
        env=environ, stdout=subprocess.PIPE, stderr=log, text=True)


def number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return int(match.group(1).replace(",", ""))


async def test_make_run_settles_the_sample_with_no_anomaly_and_no_negative_balance(
    first_run_env: harness.TestEnv,
) -> None:
    env = first_run_env
    environ = env.environ()
    log = (env.log_dir / "first-run-worker.log").open("wb")
    proc = start_make_run(environ, log)
    out = Lines(proc.stdout)
    try:
        await asyncio.to_thread(out.wait_for, "the worker keeps running", SUMMARY_TIMEOUT_S)
        worker_log = (env.log_dir / "first-run-worker.log").read_text(errors="replace")
        # What the summary says.
        text = out.text
        assert re.search(r"\n  0 balance anomalies, 0 negative balances \(150 users", text), text
        trades = number(r"published [\d,]+ sample records .*?, ([\d,]+) trades", text)
        assert number(r"\n  ([\d,]+) trades and [\d,]+ balance events settled", text) == trades
        assert trades > 300
        duplicates = number(r"on purpose: ([\d,]+) duplicates", text)
        assert number(r"settled, ([\d,]+) duplicates skipped", text) == duplicates > 0
        for step in ("balances 10", "keys create 10", "X-API-Key: $KEY", " status"):
            assert step in text, step
        # What is true, checked apart from the summary: the worker's own counters, every
        # row of the keyspace, the stored trades and the dead-letter topic.
        port = int(environ["SETTLER_METRICS_PORT"])
        _, page = await harness.scrape(port)
        anomalies = [line for line in page.splitlines()
                     if line.startswith("settler_balance_anomalies_total{")]
        assert anomalies and all(line.endswith(" 0.0") for line in anomalies), anomalies
        assert "balance below zero" not in worker_log
        rows = harness.balances(env.settings)
        negative = {key: row for key, row in rows.items() if row.available < 0 or row.frozen < 0}
        assert rows and not negative, negative
        assert len(harness.trade_ids(env.settings)) == trades
        letters = Counter(harness.header(r, "settler.reason")
                          for r in await harness.dead_letters(env))
        planted = re.search(r"\d+ malformed \(([^)]*)\)", text)
        assert planted, text
        assert letters == Counter({reason: int(count) for reason, count in (
            item.split() for item in planted.group(1).split(", "))})
    finally:
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)  # Ctrl-C: passed on to the worker, which drains
        try:
            code = await asyncio.to_thread(proc.wait, SHUTDOWN_BUDGET_S + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            log.close()
    assert code == 0, out.text
    assert time.monotonic() - started < SHUTDOWN_BUDGET_S + 5
    worker_log = (env.log_dir / "first-run-worker.log").read_text(errors="replace")
    assert '"worker stopped"' in worker_log, "the worker did not stop by itself"
