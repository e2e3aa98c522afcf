"""The two Cassandras of the secure dev stack are never taken for each other: pausing,
stopping or finding "cassandra" must reach the plain node the other tests use, and
"cassandra-secure" the secure one."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from settler.dev import stack as devstack
from settler.dev.secure import SecurePorts

CASSANDRA = "org.apache.cassandra.service.CassandraDaemon"


def _fake_jvm(*argv: str) -> subprocess.Popen[bytes]:
    """A process whose command line looks like one the dev stack started."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", *argv])


@pytest.fixture
def plain_and_secure() -> Iterator[tuple[int, int]]:
    marker = f"-Dsettler.devstack={devstack.stack_dir()}"
    plain = _fake_jvm(marker, CASSANDRA)
    secure = _fake_jvm(marker, "-Dsettler.devstack.service=cassandra-secure", CASSANDRA)
    try:
        yield plain.pid, secure.pid
    finally:
        for proc in (plain, secure):
            proc.kill()
            proc.wait()


def test_each_cassandra_is_recognised_as_itself_only(plain_and_secure: tuple[int, int]) -> None:
    plain, secure = plain_and_secure
    assert devstack._is_ours(plain, "cassandra")
    assert not devstack._is_ours(plain, devstack.SECURE_SERVICE)
    assert devstack._is_ours(secure, devstack.SECURE_SERVICE)
    assert not devstack._is_ours(secure, "cassandra")
    assert not devstack._is_ours(plain, "kafka")


def test_a_jvm_of_another_stack_directory_is_not_ours() -> None:
    other = _fake_jvm("-Dsettler.devstack=/elsewhere/.stack", CASSANDRA)
    try:
        assert not devstack._is_ours(other.pid, "cassandra")
    finally:
        other.kill()
        other.wait()


def test_secure_ports_sit_beside_the_plain_ones() -> None:
    ports = devstack.Ports(kafka=29092, kafka_controller=29093, cql=29042,
                           cassandra_storage=27000)
    assert ports.secure() == SecurePorts(kafka_sasl_ssl=29094, kafka_ssl=29095, cql=29142)
    assert ports.of(devstack.SECURE_SERVICE) == {"cql": 29142, "storage": 27100}
    assert ports.of("kafka", secure=True)["sasl_ssl"] == 29094
    assert "sasl_ssl" not in ports.of("kafka")
