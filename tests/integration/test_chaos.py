"""Two workers side by side for the whole test, a live stream, and the failures a
two-replica deployment sees, with the SHIPPED lease TTL, takeover wait and request
timeout (issue 10): random SIGKILLs of either worker, Cassandra frozen longer than the
revoke drain while a partition is added to the input topic, the writer stopped
(SIGSTOP) for longer than its lease, Kafka frozen. It ends with the group caught up,
balances exact against the independent model, each dead letter visible once, `settler
verify` clean, SIGTERM exit 0 for both workers, and a replay of the whole topic from
offset 0 changing no balance.

Seeded: the seed is printed and in every failure message; replay one with
SETTLER_CHAOS_SEED=<seed>. Any seed must pass.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

from settler.core.registry import Registry
from settler.dev import stack as devstack
from settler.ops.sample import SampleRecord, StreamShape, generate
from settler.worker import REVOKE_DRAIN_S
from tests import harness
from tests.model import expected_balances

pytestmark = pytest.mark.integration

SHIPPED = {"SETTLER_LEASE_TTL_S": "10", "SETTLER_TAKEOVER_WAIT_S": "auto",
           "SETTLER_CQL_REQUEST_TIMEOUT_S": "10"}
LEASE_TTL_S = 10.0
PRODUCE_OVER_S = 150.0
FAULTS = ("kill", "kill", "db_freeze_with_new_partition", "pause_writer", "kafka_freeze")


class Chaos:
    def __init__(self, env: harness.TestEnv, seed: int) -> None:
        self.env = env
        self.seed = seed
        self.rng = random.Random(seed)
        self.workers: dict[str, harness.WorkerProcess] = {}
        self.finished: list[harness.WorkerProcess] = []
        self.log: list[str] = []
        self.started = time.monotonic()

    def say(self, what: str) -> None:
        line = f"{time.monotonic() - self.started:7.1f}s {what}"
        self.log.append(line)
        print(f"chaos seed {self.seed}: {line}", flush=True)

    def start(self, name: str) -> None:
        self.workers[name] = harness.WorkerProcess(self.env, name, **SHIPPED)
        self.say(f"start {name}")

    async def writer(self) -> str | None:
        for name, worker in sorted(self.workers.items()):
            if worker.proc.poll() is None:
                try:
                    if await harness.metric(worker, "settler_writer_active") == 1:
                        return name
                except OSError:
                    continue
        return None

    async def kill(self) -> None:
        name = await self.writer() or self.rng.choice(sorted(self.workers))
        self.say(f"SIGKILL {name}")
        worker = self.workers[name]
        worker.kill()
        self.finished.append(worker)
        await asyncio.sleep(self.rng.uniform(1, 5))
        self.start(name)

    async def db_freeze_with_new_partition(self) -> None:
        frozen = REVOKE_DRAIN_S + self.rng.uniform(3, 8)
        self.say(f"Cassandra frozen for {frozen:.0f}s")
        devstack.pause("cassandra")
        try:
            await asyncio.sleep(self.rng.uniform(1, 4))
            self.say("a fourth partition added to the input topic")
            await add_partition(self.env.topic, 4)
            await asyncio.sleep(frozen)
        finally:
            devstack.resume("cassandra")
        self.say("Cassandra resumed")

    async def pause_writer(self) -> None:
        name = await self.writer() or self.rng.choice(sorted(self.workers))
        paused = LEASE_TTL_S + self.rng.uniform(3, 10)
        self.say(f"SIGSTOP {name} for {paused:.0f}s")
        worker = self.workers[name]
        worker.signal(19)  # SIGSTOP
        try:
            await asyncio.sleep(paused)
        finally:
            worker.signal(18)  # SIGCONT
        self.say(f"SIGCONT {name}")

    async def kafka_freeze(self) -> None:
        frozen = self.rng.uniform(8, 15)
        self.say(f"Kafka frozen for {frozen:.0f}s")
        devstack.pause("kafka")
        try:
            await asyncio.sleep(frozen)
        finally:
            devstack.resume("kafka")
        self.say("Kafka resumed")

    def stop_all(self) -> list[int]:
        codes = []
        for name, worker in sorted(self.workers.items()):
            codes.append(worker.stop())
            self.say(f"SIGTERM {name}: exit {codes[-1]}")
        return codes

    def kill_leftovers(self) -> None:
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.kill()


async def add_partition(topic: str, total: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=harness.BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_partitions({topic: NewPartitions(total_count=total)})
    finally:
        await admin.close()


async def produce_live(topic: str, records: list[SampleRecord], over_s: float,
                       placed: Callable[[bytes], int]) -> None:
    """The engine publishing while the faults happen: a key keeps its partition."""
    producer = AIOKafkaProducer(bootstrap_servers=harness.BOOTSTRAP, acks="all",
                                enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        chunk = max(1, len(records) // 100)
        for start in range(0, len(records), chunk):
            batch = records[start:start + chunk]
            await knows_partitions(producer, topic, {placed(r.key) for r in batch})
            futures = [await producer.send(topic, value=r.value, key=r.key,
                                           partition=placed(r.key))
                       for r in batch]
            await asyncio.gather(*futures)
            await asyncio.sleep(over_s / 100)
    finally:
        await producer.stop()


async def knows_partitions(producer: AIOKafkaProducer, topic: str, wanted: set[int]) -> None:
    """A partition added while the producer runs is unknown to it until its metadata is
    refreshed (every 5 minutes by default): sending there fails 'Unrecognized partition'."""
    deadline = time.monotonic() + 60
    while not wanted <= await producer.partitions_for(topic):
        assert time.monotonic() < deadline, f"producer never saw partitions {wanted} of {topic}"
        await producer.client.force_metadata_update()
        await asyncio.sleep(0.2)


def new_users(count: int, first_event_id: int) -> list[SampleRecord]:
    """Deposits of users the stream never saw: their keys go to the new partition."""
    return [SampleRecord(str(user).encode(), (
        f'{{"type": "deposit", "event_id": {first_event_id + n}, "user_id": {user}, '
        f'"asset_id": 1, "amount": {1000 + n}, "ts": 1700000099000}}').encode())
        for n, user in enumerate(range(900_001, 900_001 + count))]


def settler_cli(env: harness.TestEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "settler", *args], env=env.environ(),
                          capture_output=True, text=True, timeout=300, check=False)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.5)


async def test_two_workers_survive_kills_freezes_a_pause_and_a_rebalance_with_shipped_defaults(
    env: harness.TestEnv, registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = int(os.environ.get("SETTLER_CHAOS_SEED") or random.SystemRandom().getrandbits(31))
    started = time.monotonic()
    with capsys.disabled():  # in the run's output even when it passes
        print(f"\nchaos seed {seed} (replay: SETTLER_CHAOS_SEED={seed})", flush=True)
    chaos = Chaos(env, seed)
    chaos.say(f"seed {seed} (replay: SETTLER_CHAOS_SEED={seed})")
    records = generate(registry, StreamShape(events=10_000, users=150, duplicate_rate=0.05,
                                             malformed_rate=0.01, seed=seed % 100_000))
    partitions = {"count": harness.PARTITIONS}
    placement: dict[bytes, int] = {}

    def placed(key: bytes) -> int:
        return placement.setdefault(key, zlib.crc32(key) % partitions["count"])

    faults = list(FAULTS)
    chaos.rng.shuffle(faults)
    try:
        chaos.start("a")
        chaos.start("b")
        producing = asyncio.ensure_future(
            produce_live(env.topic, records, PRODUCE_OVER_S, placed))
        await harness.wait_for_progress(env, chaos.workers["a"], timeout=120)
        for fault in faults:
            await asyncio.sleep(chaos.rng.uniform(3, 10))
            await getattr(chaos, fault)()
            if fault == "db_freeze_with_new_partition":
                partitions["count"] = 4
        await producing
        extra = new_users(40, 5_000_000)
        assert any(placed(r.key) == 3 for r in extra), "no record for the new partition"
        await produce_live(env.topic, extra, 1.0, placed)
        records += extra
        chaos.say("stream produced; waiting until the group has caught up")
        await harness.wait_caught_up(env, 600)
        chaos.say("caught up")

        expected = expected_balances(registry, records)
        actual = harness.balances(env.settings)
        wrong = {key: (actual.get(key), (row.available, row.frozen, row.version))
                 for key, row in expected.items()
                 if key not in actual or (actual[key].available, actual[key].frozen,
                                          actual[key].version) != (
                     row.available, row.frozen, row.version)}
        assert set(actual) == set(expected) and not wrong, (
            f"seed {seed}: {len(wrong)} rows differ (stored, model), e.g. "
            f"{list(wrong.items())[:3]}\n" + "\n".join(chaos.log))
        letters = await harness.dead_letters(env)
        got = Counter((bytes(r.value or b""), harness.header(r, "settler.reason"))
                      for r in letters)
        want = Counter((r.value, r.expect) for r in records if r.expect is not None)
        assert got == want, (f"seed {seed}: dead letters differ: missing {want - got}, "
                             f"extra {got - want}")
        verified = await asyncio.to_thread(settler_cli, env, "verify", "--quiet")
        assert verified.returncode == 0, f"seed {seed}: verify:\n{verified.stdout}"
        codes = chaos.stop_all()
        assert codes == [0, 0], f"seed {seed}: exit codes {codes}\n" + "\n".join(chaos.log)

        before = harness.balances(env.settings)
        rewound = await asyncio.to_thread(settler_cli, env, "replay", "--from-offset", "0",
                                          "--no-wait")
        assert rewound.returncode == 0, rewound.stderr
        chaos.say("replaying the whole topic from offset 0")
        await harness.run_until_caught_up(env, 600, name="replay", **SHIPPED)
        assert harness.balances(env.settings) == before, f"seed {seed}: a replay changed rows"
        chaos.say("replay changed nothing")
        with capsys.disabled():
            print(f"\nchaos seed {seed} passed in {time.monotonic() - started:.0f} s",
                  flush=True)
    finally:
        chaos.kill_leftovers()
