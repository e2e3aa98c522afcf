"""`settler status` without a stack: the last-minute window behind its events/s and p99,
the screen and JSON it draws from what it read, and its exit codes."""

from __future__ import annotations

import math

import pytest
from prometheus_client import generate_latest

from settler import metrics
from settler.metrics import RecentWindow
from settler.ops.status import DeadLetterView, PartitionView, Status
from settler.ops.status_view import document, render, writer_line
from settler.ops.worker_endpoint import WorkerView, metric_values
from settler.store.lease import Holder

NOW_MS = 1_800_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_counts_the_last_minute_only() -> None:
    clock = Clock()
    window = RecentWindow(60, clock)
    for _ in range(600):
        window.event()
    clock.now += 59.5
    for _ in range(600):
        window.event()
    assert window.rate() == 1200 / 59.5
    clock.now += 2  # the first 600 are now older than a minute
    assert window.rate() == 600 / 60


def test_a_young_window_divides_by_the_time_since_its_first_event() -> None:
    clock = Clock()
    window = RecentWindow(60, clock)
    assert window.rate() == 0.0
    for _ in range(1000):
        window.event()
    clock.now += 2
    assert window.rate() == 500.0


def test_p99_is_within_12_percent_and_forgets_old_latencies() -> None:
    clock = Clock()
    window = RecentWindow(60, clock)
    assert window.quantile(0.99) is None
    for _ in range(97):
        window.latency(0.010)
    for _ in range(3):
        window.latency(0.800)
    p99 = window.quantile(0.99)
    assert p99 is not None and 0.800 <= p99 < 0.800 * 1.12
    p50 = window.quantile(0.5)
    assert p50 is not None and 0.010 <= p50 < 0.010 * 1.12
    assert window.quantile(1.0) == p99
    window.latency(1e6)
    assert window.quantile(1.0) == math.inf
    clock.now += 61
    assert window.quantile(0.99) is None


def test_metrics_page_shows_the_last_minutes_rate_and_p99(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A window of its own: other tests of this process (the simulation) observe too.
    monkeypatch.setattr(metrics, "RECENT", metrics.RecentWindow())
    metrics.event("deposit", "settled")
    metrics.SETTLE_LATENCY.observe(0.02)
    values = metric_values(generate_latest().decode())
    (rate,) = values["settler_events_per_second_1m"]
    (p99,) = values["settler_settle_latency_p99_seconds_1m"]
    assert rate[1] > 0 and 0.02 <= p99[1] < 0.02 * 1.12
    # The histogram itself still counts as before.
    assert values["settler_settle_latency_seconds_count"][0][1] >= 1


def status(*, committed: tuple[int | None, ...] = (100, 90, None), max_lag: int = 1000,
           writer: Holder | None = None, worker: WorkerView | None = None) -> Status:
    partitions = [PartitionView("settlement.events", p, c, 5, 100)
                  for p, c in enumerate(committed)]
    return Status(
        NOW_MS, "settlement", "settler",
        writer if writer is not None else Holder("vm:4242:abcd", 3, NOW_MS + 7_500,
                                                 1_800_000_011_000_000),
        partitions, [], DeadLetterView("settlement.events.dlq", True,
                                       {"overflow": 2, "unknown_asset": 5}),
        worker or WorkerView("http://127.0.0.1:9108", True, role="writer", ready=True,
                             events_per_s=1234.5, settle_p99_s=0.043),
        max_lag)


def test_lag_counts_from_the_oldest_record_where_the_group_never_committed() -> None:
    views = status().partitions
    assert [v.lag for v in views] == [0, 10, 95]
    assert status().lag == 105


def test_exit_code_is_1_only_beyond_max_lag() -> None:
    assert status(max_lag=105).exit_code == 0
    assert status(max_lag=104).exit_code == 1
    assert status(committed=(100, 100, 100), max_lag=0).exit_code == 0


def test_the_screen_names_every_field_an_operator_asks_for() -> None:
    screen = render(status())
    for text in ("vm:4242:abcd", "epoch 3", "lease expires in 7.5 s",
                 "ts_ceiling 1800000011000000 (2027-01-15 08:00:11 UTC)",
                 "role writer", "ready", "1,234.5 events/s", "settle p99 43 ms",
                 "TOPIC", "COMMITTED", "LAG", "105 records not settled (healthy",
                 "7 in settlement.events.dlq: unknown_asset 5, overflow 2"):
        assert text in screen, text
    assert "LAGGING: 105 records" in render(status(max_lag=10))


def test_the_writer_line_tells_released_expired_and_never_taken_apart() -> None:
    assert "lease released" in writer_line(Holder(None, 4, 0, 17), NOW_MS)
    assert "EXPIRED 3.0 s ago" in writer_line(Holder("vm:1:x", 4, NOW_MS - 3000, 17), NOW_MS)
    assert "no worker has taken" in writer_line(None, NOW_MS)


def test_a_standby_and_a_missing_worker_are_shown_as_such() -> None:
    standby = WorkerView("http://127.0.0.1:9109", True, role="standby", ready=True,
                         events_per_s=0.0)
    assert "role standby  ready  0.0 events/s  settle p99 -" in render(status(worker=standby))
    gone = WorkerView("http://127.0.0.1:9108", False, error="connection refused")
    assert "no worker answering at http://127.0.0.1:9108 (connection refused)" in render(
        status(worker=gone))


def test_the_json_document_carries_the_same_fields() -> None:
    doc = document(status(max_lag=10))
    assert doc["exit_code"] == 1 and doc["healthy"] is False and doc["lag"] == 105
    assert doc["writer"] == {"owner": "vm:4242:abcd", "epoch": 3,
                             "expires_at_ms": NOW_MS + 7_500,
                             "ts_ceiling": 1_800_000_011_000_000, "live": True}
    assert doc["partitions"][2] == {"topic": "settlement.events", "partition": 2,
                                    "committed": None, "start": 5, "end": 100, "lag": 95}
    assert doc["dead_letters"]["by_reason"] == {"overflow": 2, "unknown_asset": 5}
    assert doc["worker"]["role"] == "writer" and doc["worker"]["settle_p99_s"] == 0.043
