"""A writer cut off from the database but not from Kafka, for real (issue 10, case 3).

Worker A reaches Cassandra only through a TCP proxy (the driver keeps the proxy's
address: one node, one endpoint); standby B talks to Cassandra directly. Mid-stream the
test cuts A's link: A cannot renew, its lease lapses and it must stop writing, settling
and committing; B takes the expired lease, waits out the takeover wait and settles. Then
the link heals and everything A sent meanwhile arrives late (its retried batches, with
timestamps below B's). Nothing may be lost or doubled, with the shipped lease TTL,
takeover wait and request timeout.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from settler.core.registry import Registry
from settler.ops.sample import StreamShape, generate
from tests import harness
from tests.model import expected_balances
from tests.proxy import proxy_to

pytestmark = pytest.mark.integration

SHIPPED = {"SETTLER_LEASE_TTL_S": "10", "SETTLER_TAKEOVER_WAIT_S": "auto",
           "SETTLER_CQL_REQUEST_TIMEOUT_S": "10"}
STREAM = StreamShape(events=12_000, users=150, duplicate_rate=0.05, malformed_rate=0.01,
                     seed=23)
CUT_S = 50.0  # longer than the lease TTL plus the takeover wait (10 + 25 s)


def assert_exact(env: harness.TestEnv, registry: Registry, records: list) -> None:  # type: ignore[type-arg]
    expected = expected_balances(registry, records)
    actual = harness.balances(env.settings)
    wrong = {key: (actual.get(key), (row.available, row.frozen, row.version))
             for key, row in expected.items()
             if key not in actual or (actual[key].available, actual[key].frozen,
                                      actual[key].version) != (row.available, row.frozen,
                                                               row.version)}
    assert set(actual) == set(expected) and not wrong, (
        f"{len(wrong)} rows differ (stored, model), e.g. {list(wrong.items())[:3]}")


async def test_a_writer_cut_off_from_the_database_loses_nothing_when_the_link_heals(
    env: harness.TestEnv, registry: Registry
) -> None:
    records = generate(registry, STREAM)
    host, _, port = harness.CQL.rpartition(":")
    workers: list[harness.WorkerProcess] = []
    try:
        with proxy_to(host, int(port)) as proxy:
            cut_off = harness.WorkerProcess(
                env, "cut-off", SETTLER_CQL_CONTACT_POINTS=f"127.0.0.1:{proxy.port}",
                **SHIPPED)
            workers.append(cut_off)
            await harness.wait_for_log(cut_off, "writer lease taken", timeout=60)
            standby = harness.WorkerProcess(env, "standby", **SHIPPED)
            workers.append(standby)
            await harness.wait_for_log(standby, "standby: another worker holds", timeout=60)
            await harness.produce(env.topic, records)
            done, ends = await harness.wait_for_progress(env, cut_off)
            assert done < ends, "the stream was settled before the cut"

            proxy.cut()
            loop = asyncio.get_running_loop()
            cut_at = loop.time()
            await harness.wait_for_log(standby, "writer lease taken", timeout=60)
            await asyncio.sleep(max(0.0, CUT_S - (loop.time() - cut_at)))
            assert cut_off.proc.poll() is None, cut_off.tail()
            proxy.heal()

            await harness.wait_caught_up(env, 300, standby)
            codes = [worker.stop() for worker in workers]
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.kill()
    assert codes == [0, 0]
    lapsed, took_over = cut_off.logged("writer lease lapsed"), standby.logged(
        '"took_over_expired": true')
    assert_exact(env, registry, records)
    letters = await harness.dead_letters(env)
    got = Counter((bytes(r.value or b""), harness.header(r, "settler.reason")) for r in letters)
    assert got == Counter((r.value, r.expect) for r in records if r.expect is not None)
    assert lapsed and took_over, "the cut-off writer's lease never lapsed, or was not taken"
