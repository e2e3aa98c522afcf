"""What `settler dev status` reports: each service's state (running, starting, paused,
stopped), pid, ports, log file and server version, and which mode (plain or secure) runs,
read from the pid files, /proc and the servers themselves.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from settler.config import Settings
from settler.dev import cassandra_node, kafka_broker, secure
from settler.dev.maven import running_jar_version
from settler.dev.paths import log_path
from settler.dev.processes import pid_of, proc_state
from settler.dev.services import (
    ALL_SERVICES,
    SECURE_SERVICE,
    SERVICES,
    Ports,
    port_answers,
    ports_for,
)


@dataclass(frozen=True)
class ServiceStatus:
    """One service of the dev stack as `status` found it."""

    name: str
    state: str  # "running", "starting" (JVM up, port not answering), "paused" or "stopped"
    pid: int | None
    host: str
    ports: dict[str, int]
    answering: bool
    log: Path
    version: str | None

    @property
    def running(self) -> bool:
        return self.pid is not None


def status(settings: Settings) -> list[ServiceStatus]:
    """Each service's state, pid, ports, log file and server version (the secure Cassandra
    only while it runs or the stack is in secure mode)."""
    ports = ports_for(settings)
    kafka_secure = kafka_broker.runs_secure()
    secure_mode = kafka_secure or pid_of(SECURE_SERVICE) is not None
    statuses: list[ServiceStatus] = []
    for service in ALL_SERVICES if secure_mode else SERVICES:
        pid = pid_of(service)
        paused = pid is not None and proc_state(pid) == "T"
        answering = pid is not None and not paused and port_answers(ports.main(service))
        version = running_jar_version(service, pid)
        if service != "kafka" and answering:
            release = _release_version(service, ports)
            answering = release is not None
            version = release or version
        if pid is None:
            state = "stopped"
        elif paused:
            state = "paused"
        else:
            state = "running" if answering else "starting"
        statuses.append(
            ServiceStatus(
                name=service,
                state=state,
                pid=pid,
                host="127.0.0.1",
                ports=ports.of(service, secure=secure_mode and kafka_secure),
                answering=answering,
                log=log_path(service),
                version=version,
            )
        )
    return statuses


def _release_version(service: str, ports: Ports) -> str | None:
    if service == SECURE_SERVICE:
        material = secure.load_material()
        return secure.cql_release_version(ports.cql_secure, material) if material else None
    return cassandra_node.release_version(ports.cql)


def secure_mode_running() -> bool:
    """Whether Kafka runs with the secure listeners, the secure Cassandra runs, and the
    secure material exists (what `settler dev up --secure` leaves behind)."""
    return (kafka_broker.runs_secure() and pid_of("kafka") is not None
            and pid_of(SECURE_SERVICE) is not None and secure.load_material() is not None)


def mode_line(settings: Settings) -> str:
    """Which mode runs, and for the secure one where its listeners, CA file and settler
    settings are (never the passwords)."""
    ports = ports_for(settings)
    kafka_secure = kafka_broker.runs_secure() and pid_of("kafka") is not None
    cassandra_secure = pid_of(SECURE_SERVICE) is not None
    if not (kafka_secure or cassandra_secure):
        return ("mode: plain (no TLS, no credentials; `settler dev up --secure` adds the "
                "secure listeners)")
    material = secure.load_material()
    parts = []
    if kafka_secure:
        parts.append(f"kafka SASL_SSL 127.0.0.1:{ports.kafka_sasl_ssl} (SCRAM-SHA-512, "
                     f"SCRAM-SHA-256, PLAIN), SSL with client certificate "
                     f"127.0.0.1:{ports.kafka_ssl}")
    if cassandra_secure:
        parts.append(f"cql TLS + password 127.0.0.1:{ports.cql_secure}")
    missing = [name for name, up in (("kafka secure listeners", kafka_secure),
                                     (SECURE_SERVICE, cassandra_secure)) if not up]
    where = (f"; CA file {material.ca_file}; settler settings {material.settings_file}"
             if material else "; CA file missing")
    partly = f" (partly: {', '.join(missing)} not running)" if missing else ""
    return f"mode: secure{partly}: {'; '.join(parts)}{where}"


def format_status(statuses: list[ServiceStatus]) -> str:
    lines = []
    for item in statuses:
        pid = f"pid {item.pid}" if item.pid is not None else "-"
        ports = ", ".join(f"{name} {port}" for name, port in item.ports.items())
        lines.append(
            f"{item.name:<16} {item.state:<8} {pid:<11} {item.version or '?':<8} "
            f"{item.host} ({ports})  log {item.log}"
        )
    return "\n".join(lines)


def print_status(statuses: list[ServiceStatus], file: TextIO | None = None) -> None:
    print(format_status(statuses), file=file or sys.stdout, flush=True)


def server_versions(settings: Settings) -> dict[str, str]:
    """{"kafka": "4.1.1", "cassandra": "5.0.6"}: live versions where they answer, else jars'."""
    ports = ports_for(settings)
    kafka = running_jar_version("kafka", pid_of("kafka"))
    cassandra_pid = pid_of("cassandra")
    live = cassandra_pid is not None and proc_state(cassandra_pid) != "T"
    cassandra = (cassandra_node.release_version(ports.cql) if live else None) or (
        running_jar_version("cassandra", cassandra_pid))
    return {"kafka": kafka or "unknown", "cassandra": cassandra or "unknown"}
