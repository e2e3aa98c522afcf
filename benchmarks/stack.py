"""The benchmarks' handle on the dev stack: private topics, keyspaces and groups (dropped at
the end), producing, `settler run` as a black-box subprocess (of the working tree or of a git
revision), and CPU/RSS from /proc.

The stack is the one SETTLER_KAFKA_BOOTSTRAP and SETTLER_CQL_CONTACT_POINTS name (default
127.0.0.1:9092 and 127.0.0.1:9042, as `settler dev up`); no other SETTLER_* variable of the
environment leaks into a run."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from cassandra import OperationTimedOut
from cassandra.cluster import NoHostAvailable

from settler.config import Settings, load_settings
from settler.dev import stack as devstack
from settler.ops.sample import SampleRecord
from settler.store.schema import apply_schema, drop_keyspace
from tests.harness import delete_groups, free_port

PARTITIONS = 3
# The only SETTLER_* variables taken from the environment: where the stack is.
STACK_VARIABLES = ("SETTLER_KAFKA_BOOTSTRAP", "SETTLER_CQL_CONTACT_POINTS")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_STARTED = time.monotonic()


def progress(message: str) -> None:
    elapsed = int(time.monotonic() - _STARTED)
    print(f"[bench {elapsed // 60:02d}:{elapsed % 60:02d}] {message}", flush=True)


LOCK_PATH = Path(tempfile.gettempdir()) / "settler-benchmarks.lock"


def hold_machine() -> TextIO:
    """One benchmark run at a time on this machine: two at once share the 2 cores and both
    measure garbage. Waits for the other run; the lock lasts while the returned file is open
    (the life of this process)."""
    lock = LOCK_PATH.open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        progress(f"waiting for the benchmark run of {holder} to finish ({LOCK_PATH})")
        fcntl.flock(lock, fcntl.LOCK_EX)
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    return lock


def stack_environ() -> dict[str, str]:
    """SETTLER_* variables naming the stack, from this process's environment."""
    return {name: os.environ[name] for name in STACK_VARIABLES if name in os.environ}


def stack_settings() -> Settings:
    return load_settings(environ=stack_environ())


# -- which settler the worker runs -----------------------------------------------------------


@dataclass(frozen=True)
class WorkerSource:
    """The `settler` a worker subprocess runs: the working tree, or a git revision's
    `settler/` and `schema/` extracted with `git archive` (its keyspaces get its schema)."""

    label: str  # "working tree" or the revision as given
    commit: str
    path: Path | None = None  # the snapshot; None: the working tree

    @property
    def describe(self) -> str:
        if self.path is None:
            return f"the working tree at commit {self.commit}"
        return f"`{self.label}` = commit {self.commit}"

    def environ(self) -> dict[str, str]:
        """What a subprocess needs to import this settler first (before the editable
        install of the working tree)."""
        if self.path is None:
            return {}
        return {"PYTHONPATH": os.pathsep.join([str(self.path), str(ROOT)])}

    @property
    def cwd(self) -> Path:
        return self.path or ROOT


WORKING_TREE = "working tree"


def worker_source(rev: str | None) -> WorkerSource:
    """The working tree (rev None), or the snapshot of `rev`."""
    if rev is None:
        return WorkerSource(WORKING_TREE, _git("rev-parse", "--short", "HEAD"))
    path, commit = snapshot(rev)
    return WorkerSource(rev, commit, path)


# -- names of a run's own resources --------------------------------------------------------


@dataclass
class Stack:
    """Everything the benchmarks created, so one `cleanup()` removes it."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    base: Settings = field(default_factory=stack_settings)
    topics: list[str] = field(default_factory=list)
    keyspaces: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    @property
    def bootstrap(self) -> str:
        return self.base.kafka_bootstrap

    def settings(self, keyspace: str, topic: str = "unused", group: str = "unused") -> Settings:
        return self.base.replace(keyspace=keyspace, topics=(topic,), group_id=group,
                                 dlq_topic=f"{topic}.dlq")

    async def topic(self, label: str) -> str:
        name = f"bench.{self.run_id}.{label}"
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, PARTITIONS, 1),
                                       NewTopic(f"{name}.dlq", 1, 1)])
        finally:
            await admin.close()
        self.topics += [name, f"{name}.dlq"]
        return name

    async def keyspace(self, label: str, source: WorkerSource | None = None) -> str:
        """A fresh keyspace with the schema of `source` (default: the working tree's)."""
        name = f"bench_{self.run_id}_{label}"
        self.keyspaces.append(name)
        for attempt in range(3):
            try:
                if source is None or source.path is None:
                    await asyncio.to_thread(apply_schema, self.settings(name))
                else:
                    await self._apply_schema_of(source, name)
                return name
            except (NoHostAvailable, OperationTimedOut) as exc:
                # e.g. a test elsewhere paused Cassandra for a moment (settler dev pause)
                progress(f"  schema of {name} failed ({exc!r}), retrying")
                if attempt == 2:
                    raise
                await asyncio.sleep(5)
        return name

    async def _apply_schema_of(self, source: WorkerSource, keyspace: str) -> None:
        """`settler schema apply` of the revision itself: its own schema/ files, its own
        apply code."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SETTLER_")}
        env.update(self.environ(keyspace), **source.environ())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "settler", "schema", "apply", env=env, cwd=source.cwd,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"schema of {source.label} into {keyspace} failed (exit "
                               f"{proc.returncode}):\n{output.decode(errors='replace')[-2000:]}")

    def environ(self, keyspace: str) -> dict[str, str]:
        """SETTLER_* variables of the stack and one keyspace."""
        return {"SETTLER_KAFKA_BOOTSTRAP": self.bootstrap,
                "SETTLER_CQL_CONTACT_POINTS": ",".join(self.base.cql_contact_points),
                "SETTLER_KEYSPACE": keyspace}

    def group(self, label: str) -> str:
        name = f"bench-{self.run_id}-{label}"
        self.groups.append(name)
        return name

    async def drop_keyspace(self, keyspace: str) -> None:
        await asyncio.to_thread(drop_keyspace, self.settings(keyspace))
        self.keyspaces.remove(keyspace)

    async def drop_keyspaces(self) -> None:
        """Drop the keyspaces made so far (between A/B runs: each starts on a node holding
        the same data)."""
        for keyspace in self.keyspaces:
            await asyncio.to_thread(drop_keyspace, self.settings(keyspace))
        self.keyspaces = []

    async def cleanup(self) -> None:
        progress(f"cleaning up: {len(self.topics)} topics, {len(self.keyspaces)} keyspaces")
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            if self.topics:
                await admin.delete_topics(self.topics)
            failed = await delete_groups(admin, self.groups)
            if failed:
                progress(f"  could not delete consumer groups: {', '.join(failed)}")
        finally:
            await admin.close()
        await self.drop_keyspaces()
        self.topics, self.groups = [], []


# -- producing ---------------------------------------------------------------------------


def _producer(bootstrap: str, linger_ms: int) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                            linger_ms=linger_ms, max_batch_size=512 * 1024)


async def produce(bootstrap: str, topic: str, records: Sequence[SampleRecord],
                  chunk: int = 20_000) -> list[tuple[int, int]]:
    """Produce every record; returns the (partition, offset) of each, in order."""
    producer = _producer(bootstrap, linger_ms=20)
    await producer.start()
    positions: list[tuple[int, int]] = []
    started = time.monotonic()
    try:
        for first in range(0, len(records), chunk):
            futures = [await producer.send(topic, value=r.value, key=r.key)
                       for r in records[first:first + chunk]]
            positions += [(m.partition, m.offset) for m in await asyncio.gather(*futures)]
            if len(records) > 4 * chunk and (first // chunk) % 10 == 9:
                progress(f"  produced {len(positions):,}/{len(records):,}")
    finally:
        await producer.stop()
    rate = len(records) / max(1e-9, time.monotonic() - started)
    progress(f"  produced {len(records):,} records to {topic} ({rate:,.0f}/s)")
    return positions


async def produce_paced(bootstrap: str, topic: str, records: Sequence[SampleRecord],
                        rate: float, tick_s: float = 0.005) -> float:
    """Produce at a steady `rate` records/s (the producer stamps each record as it is sent);
    returns the rate achieved."""
    producer = _producer(bootstrap, linger_ms=5)
    await producer.start()
    sent = 0
    pending: list[asyncio.Future[Any]] = []
    started = time.monotonic()
    try:
        while sent < len(records):
            due = min(len(records), int((time.monotonic() - started) * rate) + 1)
            for record in records[sent:due]:
                pending.append(await producer.send(topic, value=record.value, key=record.key))
            sent = due
            if len(pending) > 2000:
                await asyncio.gather(*pending)
                pending = []
            await asyncio.sleep(tick_s)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return len(records) / max(1e-9, time.monotonic() - started)


async def end_offsets(bootstrap: str, topics: Sequence[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for topic in topics for p in range(PARTITIONS)]
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return ends
    finally:
        await stop_consumer(consumer)


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """aiokafka 0.14 may re-raise a CancelledError of its own internal task on stop; ours
    (Ctrl-C, SIGTERM) still goes through."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


class Offsets:
    """Committed offsets of consumer groups, through one long-lived admin client."""

    def __init__(self, bootstrap: str) -> None:
        self.admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)

    async def __aenter__(self) -> Offsets:
        await self.admin.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.admin.close()

    async def committed(self, group: str) -> dict[TopicPartition, int]:
        offsets = await self.admin.list_consumer_group_offsets(group)
        return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


def behind(committed: Mapping[TopicPartition, int], ends: Mapping[TopicPartition, int]) -> int:
    return sum(max(0, end - committed.get(tp, 0)) for tp, end in ends.items())


# -- the worker as a black box -------------------------------------------------------------


class WorkerProcess:
    """`python -m settler run` with SETTLER_* environment; its log goes to results/logs/."""

    def __init__(self, stack: Stack, *, topics: Sequence[str], keyspace: str, group: str,
                 label: str, extra_env: Mapping[str, str] | None = None,
                 source: WorkerSource | None = None) -> None:
        self.metrics_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SETTLER_")}
        env.update({
            **stack.environ(keyspace),
            "SETTLER_TOPICS": ",".join(topics),
            "SETTLER_DLQ_TOPIC": f"{topics[0]}.dlq",
            "SETTLER_GROUP_ID": group,
            "SETTLER_METRICS_HOST": "127.0.0.1",
            "SETTLER_METRICS_PORT": str(self.metrics_port),
            "SETTLER_LOG_FORMAT": "json",
            **(extra_env or {}),
        })
        if source is not None:
            env.update(source.environ())
        self.environ = env
        self.source = source
        logs = RESULTS / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{stack.run_id}-{label}.log"
        self._log = self.log_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "settler", "run"], env=env,
                                     cwd=source.cwd if source else ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}; log tail:\n"
                               f"{self.tail()}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            self._log.close()

    def tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def ready(self) -> bool:
        with contextlib.suppress(OSError, ValueError, TimeoutError):
            status, _ = await http_get(self.metrics_port, "/readyz")
            return status == 200
        return False

    async def metrics(self) -> dict[str, float]:
        _, text = await http_get(self.metrics_port, "/metrics")
        return parse_metrics(text)


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} (labels as printed)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            out[match[1] + (match[2] or "")] = float(match[3])
    return out


def metric_sum(samples: Mapping[str, float], name: str,
               where: Callable[[str], bool] = lambda _labels: True) -> float:
    """Sum of one metric family's samples whose label text passes `where`."""
    return sum(value for key, value in samples.items()
               if key.split("{", 1)[0] == name and where(key))


# -- CPU and memory from /proc -------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def busy_seconds() -> float:
    """CPU time of the whole machine that was not idle or iowait, in seconds."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLOCK_TICKS


def rss_bytes(pid: int, field_name: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def all_processes() -> dict[int, float]:
    """CPU seconds of every process alive now."""
    seen: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                seen[int(entry.name)] = cpu_seconds(int(entry.name))
    return seen


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"pid {pid}"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:80] or f"pid {pid}"


@dataclass
class CpuMeter:
    """CPU seconds of the measured process, the two JVMs, and everything else, over a span."""

    pid: int  # the process doing the settling: the worker, or this process
    baseline: dict[str, float] = field(default_factory=dict)
    wall_started: float = 0.0
    processes: dict[int, float] = field(default_factory=dict)
    # The busiest other processes over the span: (command line, % of one core).
    top_others: list[tuple[str, float]] = field(default_factory=list)

    def _read(self) -> dict[str, float]:
        jvms = devstack.pids()
        reading = {"settler": cpu_seconds(self.pid), "machine": busy_seconds(),
                   "bench": cpu_seconds(os.getpid())}
        for service in ("kafka", "cassandra"):
            pid = jvms.get(service)
            reading[service] = cpu_seconds(pid) if pid else 0.0
        return reading

    def start(self, *, from_zero: bool = False) -> None:
        """from_zero: count the measured process's CPU since it started (a fresh worker)."""
        self.processes = all_processes()
        self.baseline = self._read()
        if from_zero:
            self.baseline["settler"] = 0.0
        self.wall_started = time.monotonic()

    def stop(self) -> dict[str, float]:
        """Each part's CPU in percent of one core over the span, plus the span itself."""
        now = self._read()
        wall = max(1e-9, time.monotonic() - self.wall_started)
        ours = {self.pid, os.getpid(), *filter(None, devstack.pids().values())}
        deltas = [(value - self.processes.get(pid, 0.0), pid)
                  for pid, value in all_processes().items() if pid not in ours]
        self.top_others = [(command_line(pid), 100 * used / wall)
                           for used, pid in sorted(deltas, reverse=True)[:3] if used > 0.05 * wall]
        used = {name: now[name] - self.baseline[name] for name in now}
        if self.pid == os.getpid():
            used["bench"] = 0.0
        known = used["settler"] + used["kafka"] + used["cassandra"] + used["bench"]
        used["other"] = max(0.0, used["machine"] - known)
        return {**{name: 100 * value / wall for name, value in used.items()}, "wall_s": wall}


def machine() -> dict[str, Any]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    versions = devstack.server_versions(stack_settings())
    return {
        "nproc": os.cpu_count() or 0,
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "cpu_model": cpu_model,
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "kafka": versions.get("kafka", "unknown"),
        "cassandra": versions.get("cassandra", "unknown"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "settler")),
    }


def snapshot(rev: str) -> tuple[Path, str]:
    """`settler/` and `schema/` of a git revision, extracted with git archive to a temporary
    directory (outside the repo, so linters never see it): the settler to measure when the
    working tree is being edited. Returns (dir, commit)."""
    commit = _git("rev-parse", "--short", f"{rev}^{{commit}}")
    if not commit:
        raise SystemExit(f"--worker-rev: {rev!r} is not a git revision of this repository")
    target = Path(tempfile.gettempdir()) / "settler-benchmarks" / f"src-{commit}"
    if not (target / "settler" / "__main__.py").exists():
        archive = subprocess.run(["git", "archive", "--format=tar", commit, "settler", "schema"],
                                 capture_output=True, check=True, cwd=ROOT).stdout
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(target, filter="data")
    return target, commit


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
