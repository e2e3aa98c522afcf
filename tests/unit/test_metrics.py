"""settler.metrics: the counters the loop calls, and /metrics, /healthz, /readyz with
readiness that follows the worker's checks (no Kafka or Cassandra needed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY, generate_latest

from settler import metrics
from tests.harness import free_port, scrape


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


@contextlib.asynccontextmanager
async def serving(health: metrics.Health) -> AsyncIterator[int]:
    port = free_port()
    server = await metrics.serve("127.0.0.1", port, health)
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()


def test_events_are_counted_by_type_outcome_and_reason() -> None:
    labels = {"type": "trade", "outcome": "invalid", "reason": "overflow"}
    before = value("settler_events_total", **labels) or 0.0
    metrics.event("trade", "invalid", "overflow")
    metrics.event("trade", "invalid", "overflow")
    assert value("settler_events_total", **labels) == before + 2


def test_retry_error_and_settled_series_exist_at_zero_before_the_first_one() -> None:
    for kind in metrics.RETRY_KINDS:
        assert value("settler_retries_total", kind=kind) is not None
    assert value("settler_errors_total", kind="cql_write") is not None
    for event_type in metrics.EVENT_TYPES:
        assert value("settler_events_total", type=event_type, outcome="settled",
                     reason="") is not None


def test_declared_assets_have_an_anomaly_series_before_any_anomaly() -> None:
    metrics.declare_assets(["TESTCOIN"])
    assert value("settler_balance_anomalies_total", asset="TESTCOIN") == 0.0
    metrics.anomaly("TESTCOIN")
    assert value("settler_balance_anomalies_total", asset="TESTCOIN") == 1.0


def test_no_created_timestamps_are_exposed() -> None:
    assert b"_created" not in generate_latest()


def test_settling_records_the_event_time_and_the_wall_clock() -> None:
    metrics.settled_at(1_700_000_000_123)
    assert value("settler_last_settled_event_timestamp_seconds") == 1_700_000_000.123
    assert abs((value("settler_last_settlement_timestamp_seconds") or 0) - time.time()) < 5


async def test_readyz_is_503_until_kafka_cql_and_partitions_are_all_up() -> None:
    health = metrics.Health()
    async with serving(health) as port:
        status, body = await scrape(port, "/readyz")
        assert status == 503 and json.loads(body)["ready"] is False
        health.checks.update(kafka=True, cql=True)
        status, body = await scrape(port, "/readyz")
        assert status == 503 and json.loads(body)["failing"] == ["partitions"]
        health.checks["partitions"] = True
        status, body = await scrape(port, "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True


async def test_a_standby_says_so_and_is_ready_while_the_database_answers() -> None:
    health = metrics.Health()
    health.role = "standby"
    health.checks["cql"] = True
    async with serving(health) as port:
        status, body = await scrape(port, "/readyz")
        assert status == 200 and json.loads(body)["role"] == "standby"
        # Waiting for the lease is healthy; waiting because the database is gone is not.
        health.checks["cql"] = False
        status, body = await scrape(port, "/readyz")
    assert status == 503 and json.loads(body)["role"] == "standby"


async def test_healthz_is_200_whatever_the_checks_and_other_paths_are_404() -> None:
    async with serving(metrics.Health()) as port:
        assert (await scrape(port, "/healthz"))[0] == 200
        assert (await scrape(port, "/metrics?x=1"))[0] == 200
        assert (await scrape(port, "/nope"))[0] == 404


async def test_metrics_show_readiness_checks_and_the_age_of_the_last_settled_event() -> None:
    health = metrics.Health()
    health.checks.update(kafka=True, cql=False, partitions=True)
    metrics.settled_at(int((time.time() - 30) * 1000))
    async with serving(health) as port:
        _, text = await scrape(port, "/metrics")
    assert "settler_ready 0.0" in text
    assert 'settler_health_check{check="cql"} 0.0' in text
    assert 'settler_health_check{check="kafka"} 1.0' in text
    (age,) = [float(line.split()[1]) for line in text.splitlines()
              if line.startswith("settler_last_settled_event_age_seconds ")]
    assert 29 <= age < 60
    assert 'settler_build_info{version="' in text


async def _until(condition: object, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_a_probe_keeps_a_check_equal_to_the_latest_attempt() -> None:
    health = metrics.Health()
    database_up = [True]

    async def attempt() -> None:
        if not database_up[0]:
            raise TimeoutError("no answer")

    probing = asyncio.ensure_future(health.probe("cql", attempt, interval_s=0.01))
    try:
        await _until(lambda: health.checks["cql"])
        database_up[0] = False
        await _until(lambda: not health.checks["cql"])
        database_up[0] = True
        await _until(lambda: health.checks["cql"])
    finally:
        probing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probing


async def test_a_probe_stops_on_an_error_that_is_not_transient() -> None:
    async def attempt() -> None:
        raise ValueError("bad query")

    with pytest.raises(ValueError):
        await metrics.Health().probe(
            "cql", attempt, interval_s=0.01,
            transient=lambda exc: isinstance(exc, TimeoutError))
