"""What the worker derives from the database it connects to (issue 10 case 7, case 4)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from settler.config import DEFAULT_REGISTRY, load_settings
from settler.core.registry import load_registry
from settler.worker import Worker
from settler.worker import main as worker_main
from settler.worker.main import DEFAULT_BATCH_MAX_BYTES
from settler.worker.takeover import NODE_UPTIME_S, restarted_node_wait, takeover_wait_s


class Server:
    """The two questions the worker asks a database at start-up."""

    def __init__(self, product: str, fail_threshold: int | None) -> None:
        self.product = product
        self.fail_threshold = fail_threshold

    async def server(self) -> str:
        return self.product

    async def batch_fail_threshold(self) -> int | None:
        return self.fail_threshold


def derived(product: str, threshold: int | None, **environ: str) -> tuple[int, int]:
    worker = Worker(load_settings(environ=environ), load_registry(DEFAULT_REGISTRY))
    return asyncio.run(worker._derived(Server(product, threshold),  # type: ignore[arg-type]
                                       product))


@pytest.mark.parametrize(("product", "wait"), [("cassandra", 25), ("scylla", 75)])
def test_the_takeover_wait_outlasts_a_request_in_transit_and_the_databases_batchlog_replay(
        product: str, wait: int) -> None:
    assert derived(product, 1024 * 1024)[0] == wait == takeover_wait_s(product, 10)


def test_the_takeover_wait_follows_the_request_timeout() -> None:
    assert derived("cassandra", None, SETTLER_CQL_REQUEST_TIMEOUT_S="30")[0] == 15 + 30


def test_a_takeover_wait_set_by_the_operator_wins() -> None:
    assert derived("scylla", None, SETTLER_TAKEOVER_WAIT_S="90")[0] == 90


def test_the_batch_bound_is_80_percent_of_the_servers_fail_threshold() -> None:
    assert derived("cassandra", 50 * 1024)[1] == 40 * 1024
    assert derived("scylla", 1024 * 1024)[1] == int(0.8 * 1024 * 1024)
    assert derived("cassandra", None)[1] == DEFAULT_BATCH_MAX_BYTES
    assert derived("cassandra", 50 * 1024, SETTLER_BATCH_MAX_BYTES="10000")[1] == 10000


def restart_wait(server: str, starts: list[int] | Exception, now: float) -> float:
    """Start times and `now` both on the database's clock, as `node_uptimes` reads them."""
    async def node_uptimes() -> list[float]:
        if isinstance(starts, Exception):
            raise starts
        return [now - start for start in starts]

    return asyncio.run(restarted_node_wait(server, node_uptimes))


def test_a_takeover_waits_until_a_restarted_node_has_replayed_its_batchlog() -> None:
    """A node that started 10 s ago replays what it logged before it stopped 30-40 s after
    its start (Cassandra's RING_DELAY, then its loop): the takeover wait lasts until it
    has been up NODE_UPTIME_S."""
    now = 1_800_000_000.0
    assert restart_wait("cassandra", [int(now) - 10], now) == NODE_UPTIME_S["cassandra"] - 10
    assert restart_wait("scylla", [int(now) - 10], now) == NODE_UPTIME_S["scylla"] - 10


def test_the_most_recently_started_node_counts() -> None:
    now = 1_800_000_000.0
    assert restart_wait("cassandra", [int(now) - 3600, int(now) - 40, int(now) - 7200],
                        now) == NODE_UPTIME_S["cassandra"] - 40


def test_nodes_up_for_long_add_no_wait() -> None:
    now = 1_800_000_000.0
    assert restart_wait("cassandra", [int(now) - 3600], now) == 0.0


def test_unknown_node_start_times_wait_as_if_one_just_started() -> None:
    now = 1_800_000_000.0
    assert restart_wait("cassandra", LookupError("no gossip"), now) == NODE_UPTIME_S["cassandra"]
    assert restart_wait("cassandra", [], now) == NODE_UPTIME_S["cassandra"]


class _Recorded:
    """Stands in for a module's logger: what it was asked to log, by level."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, object]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, **fields: self.lines.append((level, event, fields))


def test_a_takeover_wait_set_below_what_the_database_needs_is_warned_about(
        monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = _Recorded()
    monkeypatch.setattr(worker_main, "log", recorded)
    assert derived("cassandra", None, SETTLER_TAKEOVER_WAIT_S="15")[0] == 15
    warned = [fields for level, event, fields in recorded.lines
              if level == "warning" and "SETTLER_TAKEOVER_WAIT_S is below" in event]
    assert warned and warned[0]["needed"] == 25, recorded.lines
    recorded.lines.clear()
    derived("cassandra", None, SETTLER_TAKEOVER_WAIT_S="30")
    assert not [line for line in recorded.lines if line[0] == "warning"], recorded.lines
