"""What the worker derives from the database it connects to (issue 10 case 7, case 4)."""

from __future__ import annotations

import asyncio

import pytest

from settler.config import DEFAULT_REGISTRY, load_settings
from settler.core.registry import load_registry
from settler.worker import Worker
from settler.worker.main import DEFAULT_BATCH_MAX_BYTES, TAKEOVER_WAIT_S


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
    return asyncio.run(worker._derived(Server(product, threshold)))  # type: ignore[arg-type]


@pytest.mark.parametrize(("product", "wait"), [("cassandra", 15), ("scylla", 75)])
def test_the_takeover_wait_outlasts_the_connected_databases_batchlog_replay(
        product: str, wait: int) -> None:
    assert derived(product, 1024 * 1024)[0] == wait == TAKEOVER_WAIT_S[product]


def test_a_takeover_wait_set_by_the_operator_wins() -> None:
    assert derived("scylla", None, SETTLER_TAKEOVER_WAIT_S="90")[0] == 90


def test_the_batch_bound_is_80_percent_of_the_servers_fail_threshold() -> None:
    assert derived("cassandra", 50 * 1024)[1] == 40 * 1024
    assert derived("scylla", 1024 * 1024)[1] == int(0.8 * 1024 * 1024)
    assert derived("cassandra", None)[1] == DEFAULT_BATCH_MAX_BYTES
    assert derived("cassandra", 50 * 1024, SETTLER_BATCH_MAX_BYTES="10000")[1] == 10000
