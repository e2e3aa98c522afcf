"""Local dev stack: real Apache Kafka (KRaft) and Apache Cassandra 5.0 as plain JVM processes.

`settler dev up | status | down` (settler.commands.dev) call `up`, `status`/`print_status`
and `down`; this module is their orchestration, and the one name the tests, benchmarks and
commands import (`from settler.dev import stack as devstack`). The parts live beside it:
`services` (names, ports), `paths` (deploy/local, the stack directory, logs, lock),
`processes` (spawn, find, pause, stop), `maven` and `jvm` (jars and Java), `kafka_broker`
and `cassandra_node` (one service each), `secure` (the secure mode's material, configs and
users) and `status` (what `settler dev status` reports).

The jars come from Maven Central through `deploy/local/pom.xml`; everything the stack writes
at run time lives under `stack_dir()` (`<repo>/.stack`, or `$SETTLER_STACK_DIR`). Both
servers listen on loopback only. `up --secure` adds a SASL_SSL and a mutual-TLS listener
beside Kafka's plain one and a second Cassandra (`cassandra-secure`, own ports and data)
with client encryption and password authentication; the plain listener and the plain
Cassandra stay exactly as they are, so tests without credentials keep working.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Callable

from settler.config import Settings
from settler.dev import cassandra_node, jvm, kafka_broker, processes
from settler.dev.maven import resolve_classpaths, running_jar_version
from settler.dev.paths import (
    STACK_DIR_ENV,
    deploy_dir,
    error_with_log,
    pid_path,
    stack_dir,
    stack_lock,
)
from settler.dev.processes import pause, pid_of, pids, proc_state, resume, write_pid
from settler.dev.secure import (
    Material,
    cql_answers,
    ensure_cassandra_roles,
    ensure_kafka_users,
    ensure_material,
    kafka_login_works,
    write_settings_file,
)
from settler.dev.services import (
    ALL_SERVICES,
    JARS_OF,
    SECURE_SERVICE,
    SERVICES,
    DevStackError,
    Ports,
    port_answers,
    ports_for,
)
from settler.dev.status import (
    ServiceStatus,
    format_status,
    mode_line,
    print_status,
    secure_mode_running,
    server_versions,
    status,
)

__all__ = [
    "SECURE_SERVICE",
    "SERVICES",
    "STACK_DIR_ENV",
    "DevStackError",
    "Ports",
    "ServiceStatus",
    "deploy_dir",
    "down",
    "format_status",
    "mode_line",
    "pause",
    "pids",
    "ports_for",
    "print_status",
    "resolve_classpaths",
    "resume",
    "secure_mode_running",
    "server_versions",
    "stack_dir",
    "status",
    "up",
]

PROGRESS_EVERY_S = 5.0

# Internals the tests reach through this module, under the names they had before the
# stack was split into the modules beside it.
_wait_for_state = processes.wait_for_state
_is_ours = processes.is_ours
_pid_of = pid_of
_jvm_options = jvm.jvm_options


def _say(message: str) -> None:
    print(message, file=sys.stdout, flush=True)


def _secs(since: float) -> str:
    return f"{time.monotonic() - since:.1f}s"


def up(settings: Settings, *, secure: bool = False, timeout_s: float = 240.0,
       quiet: bool = False) -> None:
    """Start Kafka and Cassandra (when not running), wait until both answer, apply the schema.
    With `secure`, also the secure listeners and the secure Cassandra, with their users.

    Harmless when they already run: then it only re-applies the schema (and re-creates the
    secure users). A Kafka running without the secure listeners is restarted to get them.
    """
    say: Callable[[str], None] = (lambda _message: None) if quiet else _say
    started = time.monotonic()
    ports = ports_for(settings)
    with stack_lock():
        material = _secure_material(ports, say) if secure else None
        pending = _start_missing(ports, say, quiet=quiet, material=material)
        _wait_until_answering(pending, ports, say, started, timeout_s, material)
        if material is not None:
            _set_up_secure_users(ports, material, say, started)

    try:
        from settler.store.schema import apply_schema
    except ModuleNotFoundError as exc:
        if exc.name != "settler.store.schema":
            raise
        say("note: settler.store.schema is missing, schema not applied")
    else:
        say(f"applying schema (keyspace {settings.keyspace})...")
        apply_schema(settings)
    say(
        f"dev stack up in {_secs(started)}: kafka 127.0.0.1:{ports.kafka}, "
        f"cql 127.0.0.1:{ports.cql}, logs in {stack_dir() / 'logs'}"
    )
    if material is not None:
        say(mode_line(settings))


def _secure_material(ports: Ports, say: Callable[[str], None]) -> Material:
    material, made = ensure_material()
    if made:
        say(f"made a throw-away CA, certificates and passwords in {material.directory}")
        stale = stack_dir() / SECURE_SERVICE
        if stale.exists() and pid_of(SECURE_SERVICE) is None:
            # Its roles were made for passwords that no longer exist.
            shutil.rmtree(stale)
    write_settings_file(material, ports.secure())
    return material


def _set_up_secure_users(ports: Ports, material: Material, say: Callable[[str], None],
                         started: float) -> None:
    """Kafka's SCRAM credentials and the secure Cassandra's roles; then both logins work."""
    kafka_broker.run_sync(lambda: ensure_kafka_users(f"127.0.0.1:{ports.kafka}", material))
    deadline = time.monotonic() + 30.0
    while not kafka_broker.run_sync(lambda: kafka_login_works(ports.kafka_sasl_ssl, material)):
        if time.monotonic() > deadline:
            raise error_with_log("kafka", "a SCRAM-SHA-512 login over SASL_SSL on "
                                 f"127.0.0.1:{ports.kafka_sasl_ssl} still fails after 30s")
        time.sleep(0.5)
    version = ensure_cassandra_roles(ports.cql_secure, material)
    say(f"{SECURE_SERVICE} {version} accepts TLS + password logins on "
        f"127.0.0.1:{ports.cql_secure}; kafka accepts SCRAM logins on "
        f"127.0.0.1:{ports.kafka_sasl_ssl} ({_secs(started)})")


def _check_ports_free(service: str, ports: Ports) -> None:
    for name, port in ports.of(service).items():
        if port_answers(port):
            raise DevStackError(
                f"port {port} ({service} {name}) on 127.0.0.1 is taken by a process that is "
                "not this dev stack's: stop it or choose another port"
            )


def _answers(service: str, ports: Ports, material: Material | None = None) -> bool:
    if service == "kafka":
        return kafka_broker.answers(ports.kafka)
    if service == SECURE_SERVICE:
        return material is not None and cql_answers(ports.cql_secure, material)
    return cassandra_node.release_version(ports.cql) is not None


def _start_missing(ports: Ports, say: Callable[[str], None], *, quiet: bool,
                   material: Material | None = None) -> dict[str, int]:
    """Start every service not running; return the pid of each one still to wait for."""
    pending: dict[str, int] = {}
    to_start: list[str] = []
    # Cassandra first: it takes longest.
    services = ["cassandra", *([SECURE_SERVICE] if material else []), "kafka"]
    for service in services:
        pid = pid_of(service)
        if (service == "kafka" and pid is not None and material is not None
                and kafka_broker.config_on_disk() != kafka_broker.config_text(ports, material)):
            say(f"restarting kafka (pid {pid}) with the secure listeners...")
            processes.stop({"kafka": pid}, say, time.monotonic())
            pid = None
        if pid is None:
            _check_ports_free(service, ports)
            to_start.append(service)
            continue
        if proc_state(pid) == "T":
            say(f"{service} (pid {pid}) was paused: resuming it")
            os.kill(pid, signal.SIGCONT)
        if _answers(service, ports, material):
            say(f"{service} is already running (pid {pid})")
        else:
            pending[service] = pid
    if to_start:
        jars = resolve_classpaths(quiet=quiet)
        java = jvm.java()
        for service in to_start:
            say(f"starting {service}...")
            jar_set = jars[JARS_OF[service]]
            if service == "kafka":
                pid = kafka_broker.start(java, jar_set, ports, material)
            else:
                pid = cassandra_node.start(java, jar_set, ports,
                                           material if service == SECURE_SERVICE else None)
            write_pid(service, pid)
            pending[service] = pid
    return pending


def _wait_until_answering(
    pending: dict[str, int],
    ports: Ports,
    say: Callable[[str], None],
    started: float,
    timeout_s: float,
    material: Material | None = None,
) -> None:
    deadline = started + timeout_s
    next_progress = time.monotonic() + PROGRESS_EVERY_S
    while pending:
        for service, pid in list(pending.items()):
            if not processes.is_ours(pid, service):
                pid_path(service).unlink(missing_ok=True)
                raise error_with_log(service, f"{service} exited during start-up")
            if _answers(service, ports, material):
                version = running_jar_version(service, pid)
                if service == "cassandra":
                    version = cassandra_node.release_version(ports.cql) or version
                say(
                    f"{service}{' ' + version if version else ''} is up on "
                    f"127.0.0.1:{ports.main(service)} (pid {pid}, {_secs(started)})"
                )
                del pending[service]
        if not pending:
            break
        now = time.monotonic()
        if now >= deadline:
            service = next(iter(pending))
            raise error_with_log(
                service,
                f"{service} did not answer within {timeout_s:.0f}s "
                "(it is still running; `settler dev down` stops it)",
            )
        if now >= next_progress:
            for service in pending:
                say(f"waiting for {service}... ({now - started:.0f}s)")
            next_progress = now + PROGRESS_EVERY_S
        time.sleep(0.5)


def down(settings: Settings | None = None, *, quiet: bool = False) -> None:
    """Stop every JVM of the stack (the secure Cassandra too): SIGTERM, up to 30 s to exit
    cleanly, then SIGKILL. Harmless if stopped."""
    del settings  # the stack is found through its pid files; kept for a uniform CLI
    say: Callable[[str], None] = (lambda _message: None) if quiet else _say
    started = time.monotonic()
    with stack_lock():
        running = {service: pid for service, pid in pids().items() if pid is not None}
        if not running:
            say("dev stack is not running")
        processes.stop(running, say, started)
        for service in ALL_SERVICES:
            pid_path(service).unlink(missing_ok=True)
