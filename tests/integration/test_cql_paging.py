"""cql.run returns every page of a result, not only the first (issue 10 case 8)."""

from __future__ import annotations

import asyncio

import pytest
from cassandra.query import SimpleStatement

from settler.store import cql
from tests import harness

pytestmark = pytest.mark.integration


async def test_a_result_of_many_pages_comes_back_whole(stack: None) -> None:
    with harness.scratch_keyspace("paging") as settings:
        cluster, session = await asyncio.to_thread(cql.connect, settings,
                                                   keyspace=settings.keyspace)
        try:
            for asset in range(1, 26):
                await cql.run(session, "INSERT INTO user_balances (user_id, asset_id, available,"
                              " frozen, version, updated_at) VALUES (7, %s, 1, 0, 1, 1)",
                              (asset,))
            paged = SimpleStatement("SELECT asset_id FROM user_balances WHERE user_id = 7",
                                    fetch_size=10)
            rows = await cql.run(session, paged)
        finally:
            await asyncio.to_thread(cluster.shutdown)
    assert [row[0] for row in rows] == list(range(1, 26))
