"""The dev stack's services and where they listen: the two plain JVMs (Kafka, Cassandra),
the secure mode's second Cassandra, and the loopback ports each one takes, derived from the
same settings the worker reads so that a private stack on other ports never clashes.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from settler.config import Settings

SERVICES: tuple[str, ...] = ("kafka", "cassandra")
SECURE_SERVICE = "cassandra-secure"
"""The second Cassandra of the secure mode (TLS + PasswordAuthenticator are node-wide)."""
ALL_SERVICES: tuple[str, ...] = (*SERVICES, SECURE_SERVICE)

MAIN_CLASS = {
    "kafka": "kafka.Kafka",
    "cassandra": "org.apache.cassandra.service.CassandraDaemon",
    SECURE_SERVICE: "org.apache.cassandra.service.CassandraDaemon",
}
JARS_OF = {"kafka": "kafka", "cassandra": "cassandra", SECURE_SERVICE: "cassandra"}
"""Which Maven classpath each service runs on: both Cassandras share one."""

CASSANDRA_STORAGE_PORT = 7000
SECURE_KAFKA_OFFSETS = (2, 3)
"""The SASL_SSL and mutual-TLS listeners sit on the Kafka port + 2 and + 3."""
SECURE_CQL_OFFSET = 100
"""The secure Cassandra's CQL and storage ports: the plain ones + 100 (9142, 7100)."""
_LOOPBACK_NAMES = ("localhost", "ip6-localhost")


class DevStackError(Exception):
    """The dev stack cannot do what was asked. The first line of the message says why."""


def check_service(service: str) -> None:
    if service not in ALL_SERVICES:
        raise DevStackError(
            f"unknown service {service!r}: expected one of {', '.join(ALL_SERVICES)}")


@dataclass(frozen=True)
class SecurePorts:
    """Where the secure listeners are (all on 127.0.0.1)."""

    kafka_sasl_ssl: int
    kafka_ssl: int
    cql: int


@dataclass(frozen=True)
class Ports:
    """Where the dev stack listens (always on 127.0.0.1)."""

    kafka: int
    kafka_controller: int
    cql: int
    cassandra_storage: int = CASSANDRA_STORAGE_PORT

    @property
    def kafka_sasl_ssl(self) -> int:
        return self.kafka + SECURE_KAFKA_OFFSETS[0]

    @property
    def kafka_ssl(self) -> int:
        return self.kafka + SECURE_KAFKA_OFFSETS[1]

    @property
    def cql_secure(self) -> int:
        return self.cql + SECURE_CQL_OFFSET

    @property
    def cassandra_secure_storage(self) -> int:
        return self.cassandra_storage + SECURE_CQL_OFFSET

    def secure(self) -> SecurePorts:
        return SecurePorts(self.kafka_sasl_ssl, self.kafka_ssl, self.cql_secure)

    def main(self, service: str) -> int:
        """The port that says whether `service` answers (Kafka's or the CQL one)."""
        return {"kafka": self.kafka, "cassandra": self.cql,
                SECURE_SERVICE: self.cql_secure}[service]

    def of(self, service: str, *, secure: bool = False) -> dict[str, int]:
        if service == "kafka":
            ports = {"kafka": self.kafka, "controller": self.kafka_controller}
            if secure:
                ports.update(sasl_ssl=self.kafka_sasl_ssl, ssl=self.kafka_ssl)
            return ports
        if service == SECURE_SERVICE:
            return {"cql": self.cql_secure, "storage": self.cassandra_secure_storage}
        return {"cql": self.cql, "storage": self.cassandra_storage}


def _host_port(address: str, what: str) -> tuple[str, int]:
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise DevStackError(f"{what}: expected host:port, got {address!r}")
    host = host.strip("[]")
    if not (host.startswith("127.") or host in _LOOPBACK_NAMES or host == "::1"):
        raise DevStackError(
            f"{what} is {address!r}: the dev stack runs on loopback only (use 127.0.0.1)"
        )
    return host, int(port_text)


def ports_for(settings: Settings) -> Ports:
    """Ports from the settings' first Kafka bootstrap server and first CQL contact point.

    Kafka's controller listens on the Kafka port + 1.
    """
    _, kafka = _host_port(settings.kafka_bootstrap.split(",")[0], "SETTLER_KAFKA_BOOTSTRAP")
    _, cql = _host_port(settings.cql_contact_points[0], "SETTLER_CQL_CONTACT_POINTS")
    # The storage (gossip) port is 7000 for the default CQL port 9042 and moves with it
    # otherwise, so that a second stack on other ports does not clash with the first.
    storage = CASSANDRA_STORAGE_PORT + (cql - 9042)
    if not 1024 <= storage <= 65535:
        storage = CASSANDRA_STORAGE_PORT
    return Ports(kafka=kafka, kafka_controller=kafka + 1, cql=cql, cassandra_storage=storage)


def port_answers(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
