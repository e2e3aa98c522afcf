"""Driving the real stack from tests: topics and keyspaces of a test's own, producing
records, running `settler run` as a real process, waiting for it, reading results."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import DeleteGroupsRequest
from cassandra.cluster import Session
from prometheus_client.parser import text_string_to_metric_families

from settler.config import Settings, load_settings
from settler.ops import replay
from settler.ops.sample import SampleRecord
from settler.store import cql
from settler.store.schema import apply_schema, drop_keyspace
from settler.worker import SHUTDOWN_BUDGET_S

# The stack the tests talk to: the default local one, or a private one on other ports
# (`SETTLER_KAFKA_BOOTSTRAP=127.0.0.1:19092 SETTLER_CQL_CONTACT_POINTS=127.0.0.1:19042
# settler dev up`, then the same variables for pytest).
BOOTSTRAP = os.environ.get("SETTLER_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
CQL = os.environ.get("SETTLER_CQL_CONTACT_POINTS", "127.0.0.1:9042")
STACK_ENV = {"SETTLER_KAFKA_BOOTSTRAP": BOOTSTRAP, "SETTLER_CQL_CONTACT_POINTS": CQL}
PARTITIONS = 3
KAFKA_RECOVERY_S = 60.0
T = TypeVar("T")
# How long a broker keeps a SIGKILLed worker in its group: three times the worker's
# consumer session timeout (10 s, settler.kafka.consumer), for the rebalance after it.
GROUP_EMPTY_TIMEOUT_S = 30.0
GROUP_ID_NOT_FOUND = 69  # Kafka error code: a group that never joined, nothing to delete

# Workers run with the shipped defaults, except where a test opts into these: a test that
# SIGKILLs workers over and over would otherwise wait out a 10 s lease and a 15 s takeover
# wait at each restart (a worker SIGKILLed by a test leaves no batch in a batchlog, since
# the database node does not fail, so the short wait proves the same there).
SHORT_TAKEOVER = {"SETTLER_LEASE_TTL_S": "4", "SETTLER_TAKEOVER_WAIT_S": "1"}

# What a SIGTERMed worker may take beyond its own budget (settler.worker.SHUTDOWN_BUDGET_S):
# the interpreter's teardown after its last line (about 0.3 s measured here, the CQL
# driver's threads) and scheduling on a loaded machine.
EXIT_MARGIN_S = 1.0
STOP_TIMEOUT_S = SHUTDOWN_BUDGET_S + EXIT_MARGIN_S


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class TestEnv:
    """One test's own topic, dead-letter topic, consumer group and keyspace."""

    suffix: str
    settings: Settings
    log_dir: Path

    @property
    def topic(self) -> str:
        return self.settings.topics[0]

    def environ(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SETTLER_")}
        env.update({
            **STACK_ENV,
            "SETTLER_TOPICS": self.topic,
            "SETTLER_DLQ_TOPIC": self.settings.dlq_topic,
            "SETTLER_GROUP_ID": self.settings.group_id,
            "SETTLER_KEYSPACE": self.settings.keyspace,
            "SETTLER_METRICS_HOST": "127.0.0.1",
            "SETTLER_METRICS_PORT": str(free_port()),
            "SETTLER_LOG_FORMAT": "json",
        })
        env.update(extra)
        return env


def new_env(log_dir: Path, **overrides: str) -> TestEnv:
    suffix = uuid.uuid4().hex[:10]
    settings = load_settings(environ={
        **STACK_ENV,
        "SETTLER_TOPICS": f"t.{suffix}.events",
        "SETTLER_DLQ_TOPIC": f"t.{suffix}.dlq",
        "SETTLER_GROUP_ID": f"t-{suffix}",
        "SETTLER_KEYSPACE": f"t_{suffix}",
        **overrides,
    })
    return TestEnv(suffix, settings, log_dir)


@contextlib.contextmanager
def scratch_keyspace(prefix: str) -> Iterator[Settings]:
    """Settings of a new keyspace named `prefix_<random>` with the schema applied; dropped
    on exit. For read tests that seed rows themselves (no topic, no worker)."""
    settings = load_settings(
        environ={**os.environ, "SETTLER_KEYSPACE": f"{prefix}_{secrets.token_hex(4)}"}
    )
    apply_schema(settings)
    try:
        yield settings
    finally:
        drop_keyspace(settings)


async def insert_balance(session: Session, user_id: int, asset_id: int, available: int,
                         frozen: int) -> None:
    """A user_balances row as the settling worker would leave it."""
    await cql.run(session, (
        "INSERT INTO user_balances (user_id, asset_id, available, frozen, version, updated_at,"
        " lineage) VALUES (%s, %s, %s, %s, 1, 1700000000000, {1: 1})"
    ), (user_id, asset_id, available, frozen))


async def create(env: TestEnv) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([
            NewTopic(env.topic, PARTITIONS, 1),
            NewTopic(env.settings.dlq_topic, 1, 1),
        ])
    finally:
        await admin.close()
    await asyncio.to_thread(apply_schema, env.settings)


async def destroy(env: TestEnv) -> None:
    """Remove the test's topics, its consumer groups (its own and any derived from its
    name, such as a replay's) and its keyspace."""
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.delete_topics([env.topic, env.settings.dlq_topic])
        groups = [group for group, *_ in await admin.list_consumer_groups()
                  if group.startswith(env.settings.group_id)]
        # A SIGKILLed worker stays a member until the broker's session timeout expires it.
        deadline = time.monotonic() + GROUP_EMPTY_TIMEOUT_S
        while (busy := await groups_with_members(groups)):
            assert time.monotonic() < deadline, (
                f"consumer groups still have members after {GROUP_EMPTY_TIMEOUT_S}s: {busy}")
            await asyncio.sleep(0.25)
        failed = await delete_groups(admin, groups)
        assert not failed, f"consumer groups left behind: {', '.join(failed)}"
    finally:
        await admin.close()
    if os.environ.get("SETTLER_TEST_KEEP_KEYSPACE"):
        print(f"keeping keyspace {env.settings.keyspace} (SETTLER_TEST_KEEP_KEYSPACE)")
        return
    await asyncio.to_thread(drop_keyspace, env.settings)


async def groups_with_members(groups: list[str]) -> list[str]:
    # One DescribeGroups request per group: aiokafka 0.14 failed to decode ("Buffer
    # underrun decoding string") a response describing two groups at once.
    settings = load_settings(environ=STACK_ENV)
    return [group for group in groups if (await replay.group_members(settings, group))[1]]


async def delete_groups(admin: AIOKafkaAdminClient, groups: Iterable[str]) -> list[str]:
    """DeleteGroups (API 42) at each group's coordinator; aiokafka 0.14's admin client has
    the request but no method for it. Returns the groups not deleted, with the error."""
    failed = []
    for group in groups:
        coordinator = await admin.find_coordinator(group)
        response = await admin._send_request_to_node(coordinator, DeleteGroupsRequest([group]))
        for name, error in response.results:
            if error not in (0, GROUP_ID_NOT_FOUND):
                failed.append(f"{name} (error {error})")
    return failed


async def produce(topic: str, records: Iterable[SampleRecord]) -> list[str]:
    """Send `records` in order; where each landed, as a dead letter's `settler.source`
    names it (topic/partition/offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=5,
                                enable_idempotence=True)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=r.value, key=r.key) for r in records]
        sent = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [f"{m.topic}/{m.partition}/{m.offset}" for m in sent]


async def stop_quietly(consumer: AIOKafkaConsumer) -> None:
    # aiokafka 0.14 re-raises a CancelledError of its own internal task when a
    # group-less consumer stops; it is not a cancellation of ours.
    with contextlib.suppress(asyncio.CancelledError):
        await consumer.stop()


async def kafka_lookup(what: str, lookup: Callable[[], Awaitable[T]],
                       timeout: float = KAFKA_RECOVERY_S) -> T:
    """A test's own Kafka lookup, retried while a broker that was just frozen or
    restarted answers without metadata (NodeNotReadyError: 'node id None')."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await lookup()
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: Kafka still failing after {timeout}s: "
                                     f"{exc!r}") from exc
            await asyncio.sleep(0.5)


async def end_offsets(topic: str) -> dict[TopicPartition, int]:
    return await kafka_lookup(f"end offsets of {topic}", lambda: _end_offsets_once(topic))


async def _end_offsets_once(topic: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
    assert partitions, f"topic {topic} has no partitions"
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP)
    await consumer.start()
    try:
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return ends
    finally:
        await stop_quietly(consumer)


async def committed_offsets(group: str) -> dict[TopicPartition, int]:
    settings = load_settings(environ=STACK_ENV)
    return await kafka_lookup(f"committed offsets of {group}",
                              lambda: replay.committed_offsets(settings, group))


async def wait_caught_up(env: TestEnv, timeout: float, worker: WorkerProcess | None = None
                         ) -> None:
    """Until the group's committed offsets reach the end of every input partition."""
    ends = await end_offsets(env.topic)
    deadline = time.monotonic() + timeout
    while True:
        committed = await committed_offsets(env.settings.group_id)
        if all(committed.get(tp, 0) >= end for tp, end in ends.items()):
            return
        if worker is not None and worker.proc.poll() is not None:
            raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.tail()}")
        if time.monotonic() > deadline:
            tail = worker.tail() if worker else ""
            raise AssertionError(f"not caught up after {timeout}s: committed {committed}, "
                                 f"ends {ends}\n{tail}")
        await asyncio.sleep(0.5)


async def run_until_caught_up(env: TestEnv, timeout: float, name: str = "worker",
                              **extra_env: str) -> WorkerProcess:
    """Start a worker, wait until its group has committed everything, stop it (exit 0)."""
    with running(env, name, **extra_env) as worker:
        await wait_caught_up(env, timeout, worker)
    return worker


@contextlib.contextmanager
def running(env: TestEnv, name: str = "worker", **extra_env: str) -> Iterator[WorkerProcess]:
    """A worker for the body of a `with`: SIGTERMed afterwards, and it must then exit 0
    within its shutdown budget. If the body fails, that failure is the one reported: the
    worker is stopped without a check that could replace it."""
    worker = WorkerProcess(env, name, **extra_env)
    try:
        yield worker
    except BaseException:
        worker.abandon()
        raise
    worker.assert_stops_cleanly()


class WorkerProcess:
    """`settler run` as a real OS process, so tests can SIGKILL and SIGTERM it."""

    def __init__(self, env: TestEnv, name: str = "worker", **extra_env: str) -> None:
        self.env = env
        self.environ = env.environ(**extra_env)
        self.metrics_port = int(self.environ["SETTLER_METRICS_PORT"])
        self.log_path = env.log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "settler", "run"], env=self.environ,
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM; the exit code. Killed, and TimeoutExpired raised, if it takes longer
        than `timeout` (by default its shutdown budget plus EXIT_MARGIN_S)."""
        # Before "worker starting" the SIGTERM handler may not be installed yet.
        deadline = time.monotonic() + 30
        while (self.proc.poll() is None and time.monotonic() < deadline
               and "worker starting" not in self.log_path.read_text(errors="replace")):
            time.sleep(0.05)
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._log.close()

    def assert_stops_cleanly(self) -> None:
        """SIGTERM: the worker must exit 0 within its shutdown budget (plus the margin)."""
        try:
            code = self.stop()
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker did not exit within {STOP_TIMEOUT_S}s of "
                                 f"SIGTERM (killed):\n{self.tail()}") from None
        assert code == 0, f"the worker exited with {code} on SIGTERM:\n{self.tail()}"

    def abandon(self) -> None:
        """Stop the worker after a test already failed, checking nothing: the test's own
        failure is the one to report."""
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop()
        self._log.close()

    def logged(self, text: str) -> bool:
        return text in self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        if not self._log.closed:
            self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


async def wait_for_progress(env: TestEnv, worker: WorkerProcess, timeout: float = 60
                            ) -> tuple[int, int]:
    """Until the group has committed something: (records committed, records in the topic)."""
    ends = sum((await end_offsets(env.topic)).values())
    deadline = time.monotonic() + timeout
    while (done := sum((await committed_offsets(env.settings.group_id)).values())) == 0:
        if worker.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no progress committed:\n{worker.tail()}")
        await asyncio.sleep(0.05)
    return done, ends


async def wait_for_committed(env: TestEnv, at_least: int, timeout: float,
                             worker: WorkerProcess | None = None) -> int:
    """Until the group has committed at least `at_least` records in all; how many then."""
    deadline = time.monotonic() + timeout
    while (done := sum((await committed_offsets(env.settings.group_id)).values())) < at_least:
        if worker is not None and worker.proc.poll() is not None:
            raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.tail()}")
        if time.monotonic() > deadline:
            tail = worker.tail() if worker else ""
            raise AssertionError(f"committed {done} < {at_least} after {timeout}s\n{tail}")
        await asyncio.sleep(0.05)
    return done


async def wait_for_log(worker: WorkerProcess, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in worker.log_path.read_text(errors="replace"):
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged within {timeout}s:\n{worker.tail()}")
        await asyncio.sleep(0.1)


async def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    """A plain HTTP GET on 127.0.0.1 (no client library needed for the worker's endpoints)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


async def metric(worker: WorkerProcess, name: str, **labels: str) -> float:
    """Sum of the samples of one metric whose labels include `labels` (all if none)."""
    _, text = await scrape(worker.metrics_port)
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def metric_once_served(worker: WorkerProcess, name: str, **labels: str) -> float:
    """`metric`, or 0 while a starting worker does not serve its metrics yet."""
    try:
        return await metric(worker, name, **labels)
    except ConnectionRefusedError:
        if worker.proc.poll() is not None:
            raise
        return 0.0


async def wait_for_metric(worker: WorkerProcess, name: str, timeout: float,
                          at_least: float = 1, **labels: str) -> float:
    """Until `metric(worker, name, **labels)` reaches `at_least`; its value then."""
    deadline = time.monotonic() + timeout
    while (value := await metric_once_served(worker, name, **labels)) < at_least:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} is {value}, not {at_least}, after "
                                 f"{timeout}s:\n{worker.tail()}")
        await asyncio.sleep(0.2)
    return value


@dataclass(frozen=True)
class Row:
    available: int
    frozen: int
    version: int
    updated_at: int


def read_rows(settings: Settings, query: str) -> list[Any]:
    cluster, session = cql.connect(settings, keyspace=settings.keyspace)
    try:
        return list(session.execute(query, timeout=60))
    finally:
        cluster.shutdown()


def balances(settings: Settings) -> dict[tuple[int, int], Row]:
    rows = read_rows(settings, "SELECT user_id, asset_id, available, frozen, version, updated_at"
                               " FROM user_balances")
    return {(r[0], r[1]): Row(r[2], r[3], r[4], r[5]) for r in rows}


def trade_ids(settings: Settings) -> list[int]:
    return [r[0] for r in read_rows(settings, "SELECT trade_id FROM trades")]


async def dead_letters(env: TestEnv, timeout: float = 60) -> list[Any]:
    """Every record of the dead-letter topic that a `read_committed` consumer sees (the
    dead-letter contract is stated for those: SPEC section 4)."""
    topic = env.settings.dlq_topic
    partitions = list(await end_offsets(topic))
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, auto_offset_reset="earliest",
                                isolation_level="read_committed")
    await consumer.start()
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning()
        # For this consumer the end is the last stable offset: an open transaction's
        # records are not read yet, and neither is what follows them.
        ends = await consumer.end_offsets(partitions)
        while True:
            positions = {tp: await consumer.position(tp) for tp in ends}
            if all(positions[tp] >= end for tp, end in ends.items()):
                break
            assert time.monotonic() < deadline, (
                f"dead letters not read to {ends} within {timeout}s: at {positions}")
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
    finally:
        await stop_quietly(consumer)
    return out


def header(record: Any, name: str) -> str:
    values: Mapping[str, bytes] = dict(record.headers or ())
    return values[name].decode()
