"""Fixtures over the real local stack (`settler dev up`): every integration test gets a
topic, dead-letter topic, consumer group and keyspace of its own, removed afterwards."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from settler.config import DEFAULT_REGISTRY, load_settings
from settler.core.registry import Registry, load_registry
from tests import harness


def _answers(address: str) -> bool:
    host, _, port = address.split(",")[0].rpartition(":")
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not (_answers(harness.BOOTSTRAP) and _answers(harness.CQL)):
        return ["local stack: not running (integration tests will fail; run `settler dev up`)"]
    from settler.dev import stack as devstack

    versions = devstack.server_versions(load_settings(environ=harness.STACK_ENV))
    return [f"local stack: Apache Kafka {versions.get('kafka', '?')} on {harness.BOOTSTRAP}, "
            f"Apache Cassandra {versions.get('cassandra', '?')} on {harness.CQL}"]


@pytest.fixture(scope="session")
def stack() -> None:
    missing = [name for name, address in (("Kafka", harness.BOOTSTRAP), ("Cassandra", harness.CQL))
               if not _answers(address)]
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
