"""The tests' own Kafka lookups ride out a broker that answers without metadata just
after it was frozen (CI run of stop 17: NodeNotReadyError 'node id None' in
wait_caught_up right after Kafka resumed)."""

from __future__ import annotations

import pytest
from aiokafka.errors import NodeNotReadyError

from tests import harness


async def test_a_lookup_failing_while_the_broker_recovers_is_retried() -> None:
    calls = []

    async def lookup() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise NodeNotReadyError("Attempt to send a request to node which is not ready "
                                    "(node id None).")
        return "answered"

    assert await harness.kafka_lookup("describe t", lookup, timeout=30) == "answered"
    assert len(calls) == 3


async def test_a_lookup_that_keeps_failing_ends_naming_what_was_looked_up() -> None:
    async def lookup() -> str:
        raise NodeNotReadyError("not ready")

    with pytest.raises(AssertionError, match=r"describe t: Kafka still failing after 0\.1s"):
        await harness.kafka_lookup("describe t", lookup, timeout=0.1)


async def test_a_failure_that_is_not_kafka_is_not_retried() -> None:
    calls = []

    async def lookup() -> str:
        calls.append(1)
        raise ValueError("a bug in the test")

    with pytest.raises(ValueError):
        await harness.kafka_lookup("describe t", lookup, timeout=30)
    assert len(calls) == 1
