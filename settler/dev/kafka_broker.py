"""The Kafka broker (KRaft, one node): its server.properties rendered from the checked-in
template with this stack's ports (and the secure listeners when asked), its storage
formatted once, the JVM started, and a probe that says when it really serves clients.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import os
import subprocess
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.errors import KafkaError

from settler.dev.jvm import jvm_options
from settler.dev.paths import deploy_dir, error_with_log, log_path, rotate, stack_dir
from settler.dev.processes import marker, spawn
from settler.dev.secure import Material, kafka_properties
from settler.dev.services import MAIN_CLASS, Ports, port_answers

T = TypeVar("T")

_SECURE_MARK = "# settler.dev.stack mode: secure"


def _kafka_dir() -> Path:
    return stack_dir() / "kafka"


def _render_config(ports: Ports, material: Material | None = None) -> Path:
    """Write server.properties for this start; with `material`, the secure listeners too."""
    rendered = _kafka_dir() / "server.properties"
    rendered.parent.mkdir(parents=True, exist_ok=True)
    rendered.touch(mode=0o600, exist_ok=True)  # the secure listeners' passwords are in it
    rendered.write_text(config_text(ports, material))
    return rendered


def config_text(ports: Ports, material: Material | None) -> str:
    """server.properties as a start with these ports (and `material`) would write it."""
    template = (deploy_dir() / "kafka" / "server.properties").read_text()
    data = _kafka_dir() / "data"
    listeners = [f"PLAINTEXT://127.0.0.1:{ports.kafka}"]
    if material is not None:
        listeners += [f"SASL_SSL://127.0.0.1:{ports.kafka_sasl_ssl}",
                      f"SSL://127.0.0.1:{ports.kafka_ssl}"]
    overrides = {
        "log.dirs": str(data),
        "controller.quorum.voters": f"1@127.0.0.1:{ports.kafka_controller}",
        "listeners": ",".join(
            [*listeners, f"CONTROLLER://127.0.0.1:{ports.kafka_controller}"]),
        "advertised.listeners": ",".join(listeners),
    }
    lines = [template.rstrip("\n"), "", "# ---- written by settler.dev.stack (last value wins)"]
    lines += [f"{key}={value}" for key, value in overrides.items()]
    if material is not None:
        lines += ["", _SECURE_MARK, kafka_properties(material).rstrip("\n")]
    return "\n".join(lines) + "\n"


def config_on_disk() -> str:
    """The server.properties the broker was last started with ("" before the first)."""
    try:
        return (_kafka_dir() / "server.properties").read_text()
    except OSError:
        return ""


def runs_secure() -> bool:
    """Whether Kafka was last started with the secure listeners."""
    return _SECURE_MARK in config_on_disk()


def _cluster_id() -> str:
    path = _kafka_dir() / "cluster.id"
    if path.exists():
        return path.read_text().strip()
    while True:  # like Kafka's Uuid.randomUuid(): base64url, no padding, not starting with "-"
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            break
    path.write_text(cluster_id + "\n")
    return cluster_id


def _base_argv(java: str, jars: list[Path]) -> list[str]:
    return [
        java,
        *jvm_options("kafka"),
        f"-Dlog4j2.configurationFile={deploy_dir() / 'kafka' / 'log4j2.xml'}",
        f"-Dkafka.logs.dir={stack_dir() / 'logs'}",
        "-cp",
        os.pathsep.join(str(jar) for jar in jars),
    ]


def _format_storage(java: str, jars: list[Path], config: Path) -> None:
    if (_kafka_dir() / "data" / "meta.properties").exists():
        return
    log = log_path("kafka")
    argv = [
        *_base_argv(java, jars),
        "kafka.tools.StorageTool",
        "format",
        "--ignore-formatted",
        "-t",
        _cluster_id(),
        "-c",
        str(config),
    ]
    with log.open("ab") as handle:
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, check=False
        )
    if result.returncode != 0:
        raise error_with_log(
            "kafka", f"formatting Kafka storage failed (exit {result.returncode})"
        )


def start(java: str, jars: list[Path], ports: Ports, material: Material | None = None) -> int:
    """Start the broker's JVM (formatting its storage on the first start); returns its pid."""
    log = log_path("kafka")
    rotate(log)
    config = _render_config(ports, material)
    _format_storage(java, jars, config)
    argv = [*_base_argv(java, jars), marker(), MAIN_CLASS["kafka"], str(config)]
    return spawn(argv, log)


async def _probe(bootstrap: str) -> bool:
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await client.bootstrap()
        if not client.cluster.brokers():
            return False
        # Makes the broker create __consumer_offsets and __transaction_state now rather
        # than on a test's first consumer or transaction.
        await client.coordinator_lookup(CoordinationType.GROUP, "settler-devstack")
        await client.coordinator_lookup(CoordinationType.TRANSACTION, "settler-devstack")
        return True
    except (TimeoutError, KafkaError, OSError):
        return False
    finally:
        await client.close()


def answers(port: int) -> bool:
    """Whether the broker on `port` serves metadata and both coordinators."""
    if not port_answers(port):
        return False
    with _quiet_logger("aiokafka"):  # a broker still starting makes aiokafka log errors
        return run_sync(lambda: _probe(f"127.0.0.1:{port}"))


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """asyncio.run, also from code that is itself inside a running event loop (a test)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(1, "settler-devstack-probe") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()
