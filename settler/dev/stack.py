"""Local dev stack: real Apache Kafka (KRaft) and Apache Cassandra 5.0 as plain JVM processes.

`settler dev up | status | down` (see settler.cli) call `up`, `status`/`print_status` and
`down`. The jars come from Maven Central through `deploy/local/pom.xml` (resolved once into
~/.m2; the classpath files go to `.stack/classpath/`). Everything the stack writes at run
time - data, logs, pid files, rendered configs - lives under `stack_dir()` (`<repo>/.stack`,
or `$SETTLER_STACK_DIR`). Both servers listen on loopback only.

`settler dev up --secure` adds the secure mode (settler.dev.secure: a throw-away CA,
certificates and passwords under `.stack/secure/`): Kafka gets a SASL_SSL and a mutual-TLS
listener beside the plain one, and a second Cassandra (`cassandra-secure`, own ports and data)
runs with client encryption and password authentication. The plain listener and the plain
Cassandra stay exactly as they are, so tests without credentials keep working.

The test harness also uses `pids`, `pause`/`resume` (SIGSTOP/SIGCONT a service's JVM) and
`server_versions`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from settler.config import Settings

if TYPE_CHECKING:
    from settler.dev.secure import Material, SecurePorts

__all__ = [
    "SECURE_SERVICE",
    "SERVICES",
    "DevStackError",
    "Ports",
    "ServiceStatus",
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

SERVICES: tuple[str, ...] = ("kafka", "cassandra")
SECURE_SERVICE = "cassandra-secure"
"""The second Cassandra of the secure mode (TLS + PasswordAuthenticator are node-wide)."""
ALL_SERVICES: tuple[str, ...] = (*SERVICES, SECURE_SERVICE)

STACK_DIR_ENV = "SETTLER_STACK_DIR"
CASSANDRA_STORAGE_PORT = 7000
STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 20
PROGRESS_EVERY_S = 5.0

_MAIN_CLASS = {
    "kafka": "kafka.Kafka",
    "cassandra": "org.apache.cassandra.service.CassandraDaemon",
    SECURE_SERVICE: "org.apache.cassandra.service.CassandraDaemon",
}
_JARS_OF = {"kafka": "kafka", "cassandra": "cassandra", SECURE_SERVICE: "cassandra"}
SECURE_KAFKA_OFFSETS = (2, 3)
"""The SASL_SSL and mutual-TLS listeners sit on the Kafka port + 2 and + 3."""
SECURE_CQL_OFFSET = 100
"""The secure Cassandra's CQL and storage ports: the plain ones + 100 (9142, 7100)."""
SECURE_HEAP = "-Xmx768m"
_VERSION_JAR = {
    "kafka": re.compile(r"^kafka_[0-9.]+-(?P<version>[^/]+)\.jar$"),
    "cassandra": re.compile(r"^cassandra-all-(?P<version>[^/]+)\.jar$"),
}
_LOOPBACK_NAMES = ("localhost", "ip6-localhost")

T = TypeVar("T")


class DevStackError(Exception):
    """The dev stack cannot do what was asked. The first line of the message says why."""


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
        from settler.dev.secure import SecurePorts

        return SecurePorts(self.kafka_sasl_ssl, self.kafka_ssl, self.cql_secure)

    def of(self, service: str, *, secure: bool = False) -> dict[str, int]:
        if service == "kafka":
            ports = {"kafka": self.kafka, "controller": self.kafka_controller}
            if secure:
                ports.update(sasl_ssl=self.kafka_sasl_ssl, ssl=self.kafka_ssl)
            return ports
        if service == SECURE_SERVICE:
            return {"cql": self.cql_secure, "storage": self.cassandra_secure_storage}
        return {"cql": self.cql, "storage": self.cassandra_storage}


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


# --------------------------------------------------------------------------- paths


def repo_root() -> Path:
    """The directory holding the `settler` package (and `deploy/`)."""
    return Path(__file__).resolve().parents[2]


def deploy_dir() -> Path:
    """`<repo root>/deploy/local`: the poms, server configs and JVM options of the stack."""
    path = repo_root() / "deploy" / "local"
    if not (path / "pom.xml").is_file():
        raise DevStackError(f"{path}/pom.xml not found: the dev stack runs from a source checkout")
    return path


def stack_dir() -> Path:
    """`<repo root>/.stack`, or `$SETTLER_STACK_DIR` when set."""
    override = os.environ.get(STACK_DIR_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return repo_root() / ".stack"


def _log_path(service: str) -> Path:
    return stack_dir() / "logs" / f"{service}.log"


def _pid_path(service: str) -> Path:
    return stack_dir() / "run" / f"{service}.pid"


def _classpath_path(service: str) -> Path:
    return stack_dir() / "classpath" / f"{service}.txt"


def _check_service(service: str) -> None:
    if service not in ALL_SERVICES:
        raise DevStackError(
            f"unknown service {service!r}: expected one of {', '.join(ALL_SERVICES)}")


# --------------------------------------------------------------------------- ports


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


def _port_answers(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- processes


def _proc_state(pid: int) -> str | None:
    """The kernel's one-letter process state, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) S ..." - comm may contain spaces and parentheses.
    return stat[stat.rfind(")") + 2 :].split(" ", 1)[0]


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _marker() -> str:
    return f"-Dsettler.devstack={stack_dir()}"


def _service_marker(service: str) -> str:
    return f"-Dsettler.devstack.service={service}"


def _is_ours(pid: int, service: str) -> bool:
    """Whether `pid` is a live (not zombie) JVM that this stack started for `service`."""
    state = _proc_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    argv = _cmdline(pid)
    if _MAIN_CLASS[service] not in argv or _marker() not in argv:
        return False
    # Both Cassandras share a main class; only the secure one carries a service marker
    # (a plain node started before the marker existed has none).
    return (_service_marker(SECURE_SERVICE) in argv) == (service == SECURE_SERVICE)


def _scan_for(service: str) -> int | None:
    """Find our JVM for `service` when its pid file is missing."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _is_ours(int(entry.name), service):
            return int(entry.name)
    return None


def _pid_of(service: str) -> int | None:
    path = _pid_path(service)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        pid = None
    if pid is not None and _is_ours(pid, service):
        return pid
    found = _scan_for(service)
    if found is not None:
        _write_pid(service, found)
    else:
        path.unlink(missing_ok=True)
    return found


def _write_pid(service: str, pid: int) -> None:
    path = _pid_path(service)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid}\n")


def pids() -> dict[str, int | None]:
    """The pid of each service's JVM, or None when it is not running; the secure Cassandra
    is listed only while it runs."""
    found = {service: _pid_of(service) for service in SERVICES}
    secure = _pid_of(SECURE_SERVICE)
    if secure is not None:
        found[SECURE_SERVICE] = secure
    return found


def _signal(service: str, signum: signal.Signals) -> int:
    _check_service(service)
    pid = _pid_of(service)
    if pid is None:
        raise DevStackError(f"{service} is not running (settler dev up starts it)")
    os.kill(pid, signum)
    return pid


def pause(service: str) -> None:
    """SIGSTOP the service's JVM: it keeps its sockets but answers nothing until `resume`.

    Returns once the kernel reports the process stopped.
    """
    pid = _signal(service, signal.SIGSTOP)
    _wait_for_state(pid, stopped=True)


def resume(service: str) -> None:
    """SIGCONT the service's JVM after `pause`; returns once it runs again."""
    pid = _signal(service, signal.SIGCONT)
    _wait_for_state(pid, stopped=False)


def _wait_for_state(pid: int, *, stopped: bool, timeout_s: float = 5.0) -> None:
    """Until the kernel reports the process stopped (or running again); a fault test that
    believes it froze a service that still runs would prove nothing, so this fails."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = _proc_state(pid)
        if state is None:
            raise DevStackError(f"process {pid} exited while waiting for it to "
                                f"{'stop' if stopped else 'continue'}")
        if (state == "T") == stopped:
            return
        if time.monotonic() > deadline:
            raise DevStackError(f"process {pid} did not {'stop' if stopped else 'continue'} "
                                f"within {timeout_s}s (state {state!r})")
        time.sleep(0.01)


def _spawn(argv: list[str], log: Path) -> int:
    """Start `argv` detached (own session, stdin /dev/null, output appended to `log`).

    A throw-away shell starts it in the background and exits, so the JVM is re-parented
    and never becomes a zombie of the (possibly long-lived) calling process.
    """
    script = 'log="$1"; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'
    result = subprocess.run(
        ["/bin/sh", "-c", script, "sh", str(log), *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        start_new_session=True,
        cwd=stack_dir(),
        timeout=30,
        check=False,
    )
    if result.returncode != 0 or not result.stdout.strip().isdigit():
        raise DevStackError(f"could not start {argv[0]}: {result.stderr.strip() or 'no pid'}")
    return int(result.stdout.strip())


def _rotate(log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    if log.exists() and log.stat().st_size > 0:
        log.replace(log.with_name(log.name + ".1"))


def _log_tail(service: str, lines: int = LOG_TAIL_LINES) -> str:
    path = _log_path(service)
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError:
        return f"  (no log at {path})"
    tail = [_clip(line) for line in text.splitlines()[-lines:]]
    return "\n".join(f"  | {line}" for line in tail) or f"  (empty log {path})"


def _clip(line: str, width: int = 300) -> str:
    return line if len(line) <= width else line[: width - 3] + "..."


def _error_with_log(service: str, message: str) -> DevStackError:
    return DevStackError(
        f"{message} (log: {_log_path(service)})\n"
        f"last lines of {_log_path(service).name}:\n{_log_tail(service)}"
    )


@contextlib.contextmanager
def _stack_lock() -> Iterator[None]:
    """Serialise up/down between processes (e.g. parallel test workers)."""
    directory = stack_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "devstack.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- jars


def _poms() -> list[Path]:
    base = deploy_dir()
    return [base / "pom.xml", *(base / service / "pom.xml" for service in SERVICES)]


def _poms_digest() -> str:
    digest = hashlib.sha256()
    for pom in _poms():
        digest.update(pom.read_bytes())
    return digest.hexdigest()


def _read_classpath(service: str) -> list[Path] | None:
    """The classpath file's jars, or None when it is missing or names a missing jar."""
    try:
        text = _classpath_path(service).read_text().strip()
    except OSError:
        return None
    jars = [Path(entry) for entry in text.split(os.pathsep) if entry]
    if not jars or not all(jar.is_file() for jar in jars):
        return None
    return jars


def resolve_classpaths(*, quiet: bool = False) -> dict[str, list[Path]]:
    """Each service's jars; runs Maven only when the classpath files are missing or stale."""
    digest_file = stack_dir() / "classpath" / "poms.sha256"
    digest = _poms_digest()
    current = {service: _read_classpath(service) for service in SERVICES}
    fresh = digest_file.exists() and digest_file.read_text().strip() == digest
    if fresh and all(jars is not None for jars in current.values()):
        return {service: jars for service, jars in current.items() if jars is not None}

    mvn = shutil.which("mvn")
    if mvn is None:
        raise DevStackError("Maven (mvn) is not on PATH: install Java 17 and Maven first")
    if not quiet:
        _say("resolving Kafka and Cassandra jars from Maven Central (first run only)...")
    (stack_dir() / "classpath").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-Dstyle.color=never",
            "-f",
            str(deploy_dir() / "pom.xml"),
            "dependency:build-classpath",
            f"-Dstack.dir={stack_dir()}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = "\n".join(f"  | {line}" for line in result.stdout.splitlines()[-LOG_TAIL_LINES:])
        raise DevStackError(f"resolving jars with Maven failed (exit {result.returncode})\n{tail}")
    resolved: dict[str, list[Path]] = {}
    for service in SERVICES:
        jars = _read_classpath(service)
        if jars is None:
            raise DevStackError(f"Maven wrote no usable classpath for {service}")
        resolved[service] = jars
    digest_file.write_text(digest + "\n")
    if not quiet:
        _say(f"resolved {sum(map(len, resolved.values()))} jars in {_secs(started)}")
    return resolved


def _jar_version(service: str, jars: list[Path] | None) -> str | None:
    for jar in jars or []:
        match = _VERSION_JAR[service].match(jar.name)
        if match:
            return match.group("version")
    return None


def _running_jar_version(service: str, pid: int | None) -> str | None:
    """The version of the jar the running JVM was started with, else the resolved one."""
    service = _JARS_OF[service]
    if pid is not None:
        argv = _cmdline(pid)
        if "-cp" in argv and argv.index("-cp") + 1 < len(argv):
            entries = argv[argv.index("-cp") + 1].split(os.pathsep)
            version = _jar_version(service, [Path(entry) for entry in entries])
            if version:
                return version
    try:
        entries = _classpath_path(service).read_text().strip().split(os.pathsep)
    except OSError:
        return None
    return _jar_version(service, [Path(entry) for entry in entries if entry])


# --------------------------------------------------------------------------- java


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    java = str(candidate) if candidate and candidate.is_file() else shutil.which("java")
    if java is None:
        raise DevStackError("java is not on PATH: the dev stack needs Java 17")
    result = subprocess.run(
        [java, "-version"], capture_output=True, text=True, check=False, timeout=60
    )
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr)
    if match is None:
        raise DevStackError(f"cannot tell the Java version of {java}")
    major = int(match.group(1))
    if major == 1 and match.group(2):
        major = int(match.group(2))
    if major < 17:
        raise DevStackError(f"{java} is Java {major}: the dev stack needs Java 17 or newer")
    return java


def _jvm_options(service: str) -> list[str]:
    options: list[str] = []
    for line in (deploy_dir() / service / "jvm.options").read_text().splitlines():
        option = line.strip()
        if option and not option.startswith("#"):
            options.append(option)
    return options


# --------------------------------------------------------------------------- kafka


def _kafka_dir() -> Path:
    return stack_dir() / "kafka"


_SECURE_KAFKA_MARK = "# settler.dev.stack mode: secure"


def _render_kafka_config(ports: Ports, material: Material | None = None) -> Path:
    """Write server.properties for this start; with `material`, the secure listeners too."""
    rendered = _kafka_dir() / "server.properties"
    rendered.parent.mkdir(parents=True, exist_ok=True)
    rendered.touch(mode=0o600, exist_ok=True)  # the secure listeners' passwords are in it
    rendered.write_text(_kafka_config_text(ports, material))
    return rendered


def _kafka_config_text(ports: Ports, material: Material | None) -> str:
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
        from settler.dev.secure import kafka_properties

        lines += ["", _SECURE_KAFKA_MARK, kafka_properties(material).rstrip("\n")]
    return "\n".join(lines) + "\n"


def _kafka_config_on_disk() -> str:
    try:
        return (_kafka_dir() / "server.properties").read_text()
    except OSError:
        return ""


def _kafka_runs_secure() -> bool:
    """Whether Kafka was last started with the secure listeners."""
    return _SECURE_KAFKA_MARK in _kafka_config_on_disk()


def _kafka_cluster_id() -> str:
    path = _kafka_dir() / "cluster.id"
    if path.exists():
        return path.read_text().strip()
    while True:  # like Kafka's Uuid.randomUuid(): base64url, no padding, not starting with "-"
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            break
    path.write_text(cluster_id + "\n")
    return cluster_id


def _kafka_base_argv(java: str, jars: list[Path]) -> list[str]:
    return [
        java,
        *_jvm_options("kafka"),
        f"-Dlog4j2.configurationFile={deploy_dir() / 'kafka' / 'log4j2.xml'}",
        f"-Dkafka.logs.dir={stack_dir() / 'logs'}",
        "-cp",
        os.pathsep.join(str(jar) for jar in jars),
    ]


def _format_kafka_storage(java: str, jars: list[Path], config: Path) -> None:
    if (_kafka_dir() / "data" / "meta.properties").exists():
        return
    log = _log_path("kafka")
    argv = [
        *_kafka_base_argv(java, jars),
        "kafka.tools.StorageTool",
        "format",
        "--ignore-formatted",
        "-t",
        _kafka_cluster_id(),
        "-c",
        str(config),
    ]
    with log.open("ab") as handle:
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, check=False
        )
    if result.returncode != 0:
        raise _error_with_log(
            "kafka", f"formatting Kafka storage failed (exit {result.returncode})"
        )


def _start_kafka(java: str, jars: list[Path], ports: Ports,
                 material: Material | None = None) -> int:
    log = _log_path("kafka")
    _rotate(log)
    config = _render_kafka_config(ports, material)
    _format_kafka_storage(java, jars, config)
    argv = [*_kafka_base_argv(java, jars), _marker(), _MAIN_CLASS["kafka"], str(config)]
    return _spawn(argv, log)


async def _kafka_probe_async(bootstrap: str) -> bool:
    from aiokafka.client import AIOKafkaClient, CoordinationType
    from aiokafka.errors import KafkaError

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


def _kafka_answers(port: int) -> bool:
    if not _port_answers(port):
        return False
    with _quiet_logger("aiokafka"):  # a broker still starting makes aiokafka log errors
        return _run_coroutine(lambda: _kafka_probe_async(f"127.0.0.1:{port}"))


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """asyncio.run, also from code that is itself inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(1, "settler-devstack-probe") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


# --------------------------------------------------------------------------- cassandra


def _start_cassandra(java: str, jars: list[Path], ports: Ports,
                     material: Material | None = None) -> int:
    """The plain node, or with `material` the secure one (own data, ports, config, heap)."""
    service = "cassandra" if material is None else SECURE_SERVICE
    log = _log_path(service)
    _rotate(log)
    storage = stack_dir() / service
    storage.mkdir(parents=True, exist_ok=True)
    jamm = next((jar for jar in jars if jar.name.startswith("jamm-")), None)
    config = deploy_dir() / "cassandra" / "cassandra.yaml"
    cql, storage_port = ports.cql, ports.cassandra_storage
    extra: list[str] = []
    if material is not None:
        from settler.dev.secure import cassandra_yaml

        config = storage / "cassandra.yaml"
        config.touch(mode=0o600, exist_ok=True)  # holds the keystore password
        config.write_text(cassandra_yaml(material))
        cql, storage_port = ports.cql_secure, ports.cassandra_secure_storage
        extra = [SECURE_HEAP, _service_marker(SECURE_SERVICE)]
    argv = [
        java,
        *_jvm_options("cassandra"),
        *extra,
        *([f"-javaagent:{jamm}"] if jamm else []),
        f"-Dcassandra.config={config.as_uri()}",
        f"-Dcassandra.storagedir={storage}",
        f"-Dcassandra.logdir={stack_dir() / 'logs'}",
        f"-Dlogback.configurationFile={deploy_dir() / 'cassandra' / 'logback.xml'}",
        f"-Dcassandra.native_transport_port={cql}",
        f"-Dcassandra.storage_port={storage_port}",
        _marker(),
        "-cp",
        os.pathsep.join(str(jar) for jar in jars),
        _MAIN_CLASS[service],
    ]
    return _spawn(argv, log)


def _cql_release_version(port: int, timeout_s: float = 5.0) -> str | None:
    """`release_version` from system.local, or None when Cassandra does not answer."""
    if not _port_answers(port):
        return None
    from cassandra import DriverException
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
    from cassandra.io.asyncioreactor import AsyncioConnection
    from cassandra.policies import WhiteListRoundRobinPolicy

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


# --------------------------------------------------------------------------- up / down


def _say(message: str) -> None:
    print(message, file=sys.stdout, flush=True)


def _secs(since: float) -> str:
    return f"{time.monotonic() - since:.1f}s"


def _check_ports_free(service: str, ports: Ports) -> None:
    for name, port in ports.of(service).items():
        if _port_answers(port):
            raise DevStackError(
                f"port {port} ({service} {name}) on 127.0.0.1 is taken by a process that is "
                "not this dev stack's: stop it or choose another port"
            )


def _answers(service: str, ports: Ports, material: Material | None = None) -> bool:
    if service == "kafka":
        return _kafka_answers(ports.kafka)
    if service == SECURE_SERVICE:
        from settler.dev.secure import cql_answers

        return material is not None and cql_answers(ports.cql_secure, material)
    return _cql_release_version(ports.cql) is not None


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
    with _stack_lock():
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
    from settler.dev.secure import ensure_material, write_settings_file

    material, made = ensure_material()
    if made:
        say(f"made a throw-away CA, certificates and passwords in {material.directory}")
        stale = stack_dir() / SECURE_SERVICE
        if stale.exists() and _pid_of(SECURE_SERVICE) is None:
            # Its roles were made for passwords that no longer exist.
            shutil.rmtree(stale)
    write_settings_file(material, ports.secure())
    return material


def _set_up_secure_users(ports: Ports, material: Material, say: Callable[[str], None],
                         started: float) -> None:
    """Kafka's SCRAM credentials and the secure Cassandra's roles; then both logins work."""
    from settler.dev.secure import (
        ensure_cassandra_roles,
        ensure_kafka_users,
        kafka_login_works,
    )

    _run_coroutine(lambda: ensure_kafka_users(f"127.0.0.1:{ports.kafka}", material))
    deadline = time.monotonic() + 30.0
    while not _run_coroutine(lambda: kafka_login_works(ports.kafka_sasl_ssl, material)):
        if time.monotonic() > deadline:
            raise _error_with_log("kafka", "a SCRAM-SHA-512 login over SASL_SSL on "
                                  f"127.0.0.1:{ports.kafka_sasl_ssl} still fails after 30s")
        time.sleep(0.5)
    version = ensure_cassandra_roles(ports.cql_secure, material)
    say(f"{SECURE_SERVICE} {version} accepts TLS + password logins on "
        f"127.0.0.1:{ports.cql_secure}; kafka accepts SCRAM logins on "
        f"127.0.0.1:{ports.kafka_sasl_ssl} ({_secs(started)})")


def _start_missing(ports: Ports, say: Callable[[str], None], *, quiet: bool,
                   material: Material | None = None) -> dict[str, int]:
    """Start every service not running; return the pid of each one still to wait for."""
    pending: dict[str, int] = {}
    to_start: list[str] = []
    # Cassandra first: it takes longest.
    services = ["cassandra", *([SECURE_SERVICE] if material else []), "kafka"]
    for service in services:
        pid = _pid_of(service)
        if (service == "kafka" and pid is not None and material is not None
                and _kafka_config_on_disk() != _kafka_config_text(ports, material)):
            say(f"restarting kafka (pid {pid}) with the secure listeners...")
            _stop({"kafka": pid}, say, time.monotonic())
            pid = None
        if pid is None:
            _check_ports_free(service, ports)
            to_start.append(service)
            continue
        if _proc_state(pid) == "T":
            say(f"{service} (pid {pid}) was paused: resuming it")
            os.kill(pid, signal.SIGCONT)
        if _answers(service, ports, material):
            say(f"{service} is already running (pid {pid})")
        else:
            pending[service] = pid
    if to_start:
        jars = resolve_classpaths(quiet=quiet)
        java = _java()
        for service in to_start:
            say(f"starting {service}...")
            jar_set = jars[_JARS_OF[service]]
            if service == "kafka":
                pid = _start_kafka(java, jar_set, ports, material)
            else:
                pid = _start_cassandra(java, jar_set, ports,
                                       material if service == SECURE_SERVICE else None)
            _write_pid(service, pid)
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
            if not _is_ours(pid, service):
                _pid_path(service).unlink(missing_ok=True)
                raise _error_with_log(service, f"{service} exited during start-up")
            if _answers(service, ports, material):
                version = _running_jar_version(service, pid)
                if service == "cassandra":
                    version = _cql_release_version(ports.cql) or version
                port = {"kafka": ports.kafka, "cassandra": ports.cql,
                        SECURE_SERVICE: ports.cql_secure}[service]
                say(
                    f"{service}{' ' + version if version else ''} is up on 127.0.0.1:{port} "
                    f"(pid {pid}, {_secs(started)})"
                )
                del pending[service]
        if not pending:
            break
        now = time.monotonic()
        if now >= deadline:
            service = next(iter(pending))
            raise _error_with_log(
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
    with _stack_lock():
        running = {service: pid for service, pid in pids().items() if pid is not None}
        if not running:
            say("dev stack is not running")
        _stop(running, say, started)
        for service in ALL_SERVICES:
            _pid_path(service).unlink(missing_ok=True)


def _stop(running: dict[str, int], say: Callable[[str], None], started: float) -> None:
    """SIGTERM each service, wait up to STOP_TIMEOUT_S, then SIGKILL what is left."""
    stopping = list(running)
    running = dict(running)
    for service, pid in running.items():
        say(f"stopping {service} (pid {pid})...")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)  # a paused JVM handles SIGTERM only once resumed
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while running and time.monotonic() < deadline:
        for service, pid in list(running.items()):
            if not _is_ours(pid, service):
                say(f"{service} stopped ({_secs(started)})")
                del running[service]
        if running:
            time.sleep(0.25)
    for service, pid in running.items():
        say(f"{service} did not stop within {STOP_TIMEOUT_S:.0f}s: killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    kill_deadline = time.monotonic() + 10.0
    while any(_is_ours(pid, svc) for svc, pid in running.items()):
        if time.monotonic() > kill_deadline:
            raise DevStackError("a dev stack JVM survived SIGKILL: " + ", ".join(running))
        time.sleep(0.1)
    for service in stopping:
        _pid_path(service).unlink(missing_ok=True)


# --------------------------------------------------------------------------- status


def status(settings: Settings) -> list[ServiceStatus]:
    """Each service's state, pid, ports, log file and server version (the secure Cassandra
    only while it runs or the stack is in secure mode)."""
    ports = ports_for(settings)
    secure = _kafka_runs_secure() or _pid_of(SECURE_SERVICE) is not None
    statuses: list[ServiceStatus] = []
    for service in ALL_SERVICES if secure else SERVICES:
        pid = _pid_of(service)
        main_port = {"kafka": ports.kafka, "cassandra": ports.cql,
                     SECURE_SERVICE: ports.cql_secure}[service]
        paused = pid is not None and _proc_state(pid) == "T"
        answering = pid is not None and not paused and _port_answers(main_port)
        version = _running_jar_version(service, pid)
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
                ports=ports.of(service, secure=secure and _kafka_runs_secure()),
                answering=answering,
                log=_log_path(service),
                version=version,
            )
        )
    return statuses


def _release_version(service: str, ports: Ports) -> str | None:
    if service == SECURE_SERVICE:
        from settler.dev.secure import cql_release_version, load_material

        material = load_material()
        return cql_release_version(ports.cql_secure, material) if material else None
    return _cql_release_version(ports.cql)


def secure_mode_running() -> bool:
    """Whether Kafka runs with the secure listeners, the secure Cassandra runs, and the
    secure material exists (what `settler dev up --secure` leaves behind)."""
    from settler.dev.secure import load_material

    return (_kafka_runs_secure() and _pid_of("kafka") is not None
            and _pid_of(SECURE_SERVICE) is not None and load_material() is not None)


def mode_line(settings: Settings) -> str:
    """Which mode runs, and for the secure one where its listeners, CA file and settler
    settings are (never the passwords)."""
    from settler.dev.secure import load_material

    ports = ports_for(settings)
    kafka_secure = _kafka_runs_secure() and _pid_of("kafka") is not None
    cassandra_secure = _pid_of(SECURE_SERVICE) is not None
    if not (kafka_secure or cassandra_secure):
        return ("mode: plain (no TLS, no credentials; `settler dev up --secure` adds the "
                "secure listeners)")
    material = load_material()
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
    kafka = _running_jar_version("kafka", _pid_of("kafka"))
    cassandra_pid = _pid_of("cassandra")
    live = cassandra_pid is not None and _proc_state(cassandra_pid) != "T"
    cassandra = (_cql_release_version(ports.cql) if live else None) or _running_jar_version(
        "cassandra", cassandra_pid
    )
    return {"kafka": kafka or "unknown", "cassandra": cassandra or "unknown"}
