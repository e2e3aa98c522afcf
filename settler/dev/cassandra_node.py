"""The Cassandra nodes: the plain one the tests use and, in the secure mode, a second one
with its own data, ports, heap and rendered config (TLS + passwords); each started as a JVM
from the resolved jars, and asked its release_version to tell it answers.
"""

from __future__ import annotations

import os
from pathlib import Path

from cassandra import DriverException
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
from cassandra.io.asyncioreactor import AsyncioConnection
from cassandra.policies import WhiteListRoundRobinPolicy

from settler.dev.jvm import jvm_options
from settler.dev.paths import deploy_dir, log_path, rotate, stack_dir
from settler.dev.processes import marker, service_marker, spawn
from settler.dev.secure import Material, cassandra_yaml
from settler.dev.services import MAIN_CLASS, SECURE_SERVICE, Ports, port_answers

SECURE_HEAP = "-Xmx768m"


def start(java: str, jars: list[Path], ports: Ports, material: Material | None = None) -> int:
    """The plain node, or with `material` the secure one (own data, ports, config, heap)."""
    service = "cassandra" if material is None else SECURE_SERVICE
    log = log_path(service)
    rotate(log)
    storage = stack_dir() / service
    storage.mkdir(parents=True, exist_ok=True)
    jamm = next((jar for jar in jars if jar.name.startswith("jamm-")), None)
    config = deploy_dir() / "cassandra" / "cassandra.yaml"
    cql, storage_port = ports.cql, ports.cassandra_storage
    extra: list[str] = []
    if material is not None:
        config = storage / "cassandra.yaml"
        config.touch(mode=0o600, exist_ok=True)  # holds the keystore password
        config.write_text(cassandra_yaml(material))
        cql, storage_port = ports.cql_secure, ports.cassandra_secure_storage
        extra = [SECURE_HEAP, service_marker(SECURE_SERVICE)]
    argv = [
        java,
        *jvm_options("cassandra"),
        *extra,
        *([f"-javaagent:{jamm}"] if jamm else []),
        f"-Dcassandra.config={config.as_uri()}",
        f"-Dcassandra.storagedir={storage}",
        f"-Dcassandra.logdir={stack_dir() / 'logs'}",
        f"-Dlogback.configurationFile={deploy_dir() / 'cassandra' / 'logback.xml'}",
        f"-Dcassandra.native_transport_port={cql}",
        f"-Dcassandra.storage_port={storage_port}",
        marker(),
        "-cp",
        os.pathsep.join(str(jar) for jar in jars),
        MAIN_CLASS[service],
    ]
    return spawn(argv, log)


def release_version(port: int, timeout_s: float = 5.0) -> str | None:
    """`release_version` from system.local, or None when Cassandra does not answer."""
    if not port_answers(port):
        return None
    profile = ExecutionProfile(
        load_balancing_policy=WhiteListRoundRobinPolicy(["127.0.0.1"]), request_timeout=timeout_s
    )
    cluster = Cluster(
        ["127.0.0.1"],
        port=port,
        protocol_version=5,
        # Not the default libev reactor: after a few connect/shutdown cycles its atexit hook
        # can hold up interpreter exit for 5 s (joining its event-loop thread).
        connection_class=AsyncioConnection,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connect_timeout=timeout_s,
        control_connection_timeout=timeout_s,
    )
    try:
        session = cluster.connect()
        row = session.execute("SELECT release_version FROM system.local").one()
        return str(row.release_version) if row is not None else None
    except (DriverException, NoHostAvailable, OSError):
        return None
    finally:
        cluster.shutdown()
