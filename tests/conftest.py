"""Fixtures over the real local stack (`settler dev up`): every integration test gets a
topic, dead-letter topic, consumer group and keyspace of its own, removed afterwards."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from settler.config import DEFAULT_REGISTRY, load_settings
from settler.registry import Registry, load_registry
from tests import harness


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not (_answers(9092) and _answers(9042)):
        return ["local stack: not running (integration tests will fail; run `settler dev up`)"]
    from settler import devstack

    versions = devstack.server_versions(load_settings(environ={}))
    return [f"local stack: Apache Kafka {versions.get('kafka', '?')} on 127.0.0.1:9092, "
            f"Apache Cassandra {versions.get('cassandra', '?')} on 127.0.0.1:9042"]


@pytest.fixture(scope="session")
def stack() -> None:
    missing = [name for name, port in (("Kafka", 9092), ("Cassandra", 9042))
               if not _answers(port)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not answering on 127.0.0.1: run `settler dev up` "
                    "(or `make test`, which starts and stops the stack)", pytrace=False)


@pytest.fixture(scope="session")
def registry() -> Registry:
    return load_registry(DEFAULT_REGISTRY)


@pytest.fixture
async def env(stack: None, tmp_path: Path) -> AsyncIterator[harness.TestEnv]:
    test_env = harness.new_env(tmp_path)
    await harness.create(test_env)
    try:
        yield test_env
    finally:
        await asyncio.wait_for(harness.destroy(test_env), 120)
