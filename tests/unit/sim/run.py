"""One simulated deployment: the REAL `settler.worker.Worker` (two of them, side by side),
simulated Kafka and Cassandra, a live stream, and seeded faults; then the checks.

Every timing is the shipped default (lease TTL, takeover wait, request timeout, retry
bounds, commit interval, session and rebalance timeouts, revoke drain) because time is
virtual: a 25 s takeover wait costs nothing. A `Scenario` is fully determined by its
fields; `Scenario(...).simulate()` replays it exactly (same Python hash seed).
"""

from __future__ import annotations

import asyncio
import collections
import io
import os
import random
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import structlog
from aiokafka import TopicPartition

from settler import kafka as settler_kafka
from settler import logs
from settler.config import DEFAULT_REGISTRY, Settings, load_settings
from settler.core.events import Rejected, Trade, decode, digest
from settler.core.registry import load_registry
from settler.ops.sample import SampleRecord, StreamShape, generate
from settler.worker import Worker
from settler.worker.ports import Clients, Store
from tests.model import expected_balances
from tests.unit.sim.cassandra import Faults, SimCassandra, SimStore
from tests.unit.sim.kafka import SimConsumer, SimKafka, SimProducer, SimRecord
from tests.unit.sim.world import Process, World
from tests.unit.simdb import Mutation, SimDb

REGISTRY = load_registry(DEFAULT_REGISTRY)
TOPIC = "sim.events"
DLQ = "sim.events.dlq"
GROUP = "sim"

LOG_LEVEL = os.environ.get("SETTLER_SIM_LOG_LEVEL", "warning")
FAULT_KINDS = ("kill", "term", "pause", "db_freeze", "db_crash", "db_slow", "write_errors",
               "kafka_freeze", "add_partition", "db_cut", "lease_errors", "db_kill")


@dataclass(frozen=True)
class Scenario:
    seed: int
    events: int = 150
    users: int = 8
    zipf: float = 0.0
    duplicate_rate: float = 0.05
    malformed_rate: float = 0.05
    partitions: int = 3
    cross_copies: int = 0  # valid records also re-sent into another partition
    workers: int = 2
    faults: tuple[str, ...] = FAULT_KINDS
    fault_count: int = 4
    produce_over_s: float = 60.0
    bursts: int = 6
    max_rows: int = 20
    max_ids: int = 30
    batch_events: int = 32
    fail_threshold_bytes: int = 50 * 1024
    batch_max_bytes: int | None = None  # None: auto (80% of the node's fail threshold)
    request_error: float = 0.0
    clock_skew_s: float = 0.0  # the second worker's wall clock is this far ahead
    replay: bool = False  # after catching up, rewind the group to 0 and settle again

    def simulate(self) -> Simulation:
        simulation = Simulation(self)
        simulation.run()
        return simulation


class SimClock:
    def __init__(self, world: World, skew_s: float) -> None:
        self.world = world
        self.skew_s = skew_s

    def monotonic(self) -> float:
        return self.world.now

    def wall_us(self) -> int:
        return int((self.world.now + self.skew_s) * 1_000_000)


class LogTail(io.StringIO):
    """The last lines the workers logged (printed when an example fails)."""

    def __init__(self, keep: int = int(os.environ.get("SETTLER_SIM_LOG_KEEP", "400"))) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)

    def write(self, text: str) -> int:
        self.lines.extend(line for line in text.splitlines()
                          if line and "balance below zero" not in line)
        return len(text)


@dataclass
class WorkerRun:
    name: str
    process: Process
    worker: Worker
    task: asyncio.Task[int]


@dataclass
class Simulation:
    scenario: Scenario
    rng: random.Random = field(init=False)
    world: World = field(init=False)
    node: SimCassandra = field(init=False)
    kafka: SimKafka = field(init=False)
    settings: Settings = field(init=False)
    records: list[SampleRecord] = field(init=False)
    positions: dict[tuple[int, int], SampleRecord] = field(default_factory=dict)
    workers: dict[str, WorkerRun] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    exit_codes: list[tuple[str, int]] = field(default_factory=list)
    log: LogTail = field(default_factory=LogTail)

    def __post_init__(self) -> None:
        scenario = self.scenario
        self.rng = random.Random(scenario.seed)
        self.world = World(random.Random(self.rng.getrandbits(64)))
        self.node = SimCassandra(
            self.world, random.Random(self.rng.getrandbits(64)),
            Faults(request_error=scenario.request_error,
                   fail_threshold_bytes=scenario.fail_threshold_bytes))
        self.kafka = SimKafka(self.world, random.Random(self.rng.getrandbits(64)), TOPIC, DLQ,
                              scenario.partitions)
        self.settings = load_settings(environ={
            "SETTLER_TOPICS": TOPIC, "SETTLER_DLQ_TOPIC": DLQ, "SETTLER_GROUP_ID": GROUP,
            "SETTLER_KEYSPACE": "sim",
            "SETTLER_BALANCE_CACHE_ROWS": str(scenario.max_rows),
            "SETTLER_RECENT_IDS": str(scenario.max_ids),
            "SETTLER_BATCH_EVENTS": str(scenario.batch_events),
            "SETTLER_BATCH_MAX_BYTES": str(scenario.batch_max_bytes or "auto"),
        })
        shape = StreamShape(events=scenario.events, users=scenario.users, zipf=scenario.zipf,
                            duplicate_rate=scenario.duplicate_rate,
                            malformed_rate=scenario.malformed_rate,
                            seed=self.rng.getrandbits(16))
        self.records = generate(REGISTRY, shape)

    # -- the deployment --------------------------------------------------------------------

    def start_worker(self, name: str) -> None:
        process = self.world.process(f"{name}#{len(self.world.processes)}")
        skew = self.scenario.clock_skew_s if name == "b" else 0.0
        node, kafka, settings = self.node, self.kafka, self.settings

        async def open_store() -> Store:
            return SimStore(node, process, settings.cql_request_timeout_s)

        clients = Clients(
            open_store=open_store,
            consumer=lambda: SimConsumer(kafka, process),
            producer=lambda: SimProducer(kafka, settler_kafka.transactional_id(settings),
                                         GROUP),
            clock=SimClock(self.world, skew),
            serve_metrics=False,
        )
        worker = Worker(settings, REGISTRY, clients)
        # Every log line of this process names it (the task copies this context).
        tokens = structlog.contextvars.bind_contextvars(proc=process.name)
        try:
            task = process.start(worker.run())
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
        task.add_done_callback(lambda done: self._exited(name, done))
        self.workers[name] = WorkerRun(name, process, worker, task)
        self.events.append(f"{self.world.now:.3f} start {process.name}")

    def _exited(self, name: str, task: asyncio.Task[int]) -> None:
        self.exit_codes.append((name, task.result()))

    def engine(self) -> None:
        """The matching engine publishes the stream over `produce_over_s`; a key keeps its
        partition (a new key is placed over the partitions there are now)."""
        scenario = self.scenario
        placement: dict[bytes, int] = {}
        stream = list(self.records)
        valid = [record for record in stream if record.expect is None]
        copies = self.rng.sample(valid, min(scenario.cross_copies, len(valid))) if (
            scenario.partitions > 1) else []
        copied: set[int] = set()
        for copy in copies:  # re-sent into another partition, anywhere later
            resent = SampleRecord(copy.key, copy.value, None, duplicate=True)
            copied.add(id(resent))
            stream.insert(self.rng.randint(stream.index(copy) + 1, len(stream)), resent)
        # Bursts: the stream comes in a few rushes at random moments of the window, so
        # faults meet a full pipeline as well as an idle one.
        starts = sorted(self.rng.uniform(0, scenario.produce_over_s)
                        for _ in range(scenario.bursts))
        times = sorted(self.rng.choice(starts) + self.rng.uniform(0, 0.5)
                       for _ in stream)
        for index, record in enumerate(stream):
            def publish(record: SampleRecord = record, cross: bool = id(record) in copied
                        ) -> None:
                partitions = len(self.kafka.logs)
                home = placement.setdefault(record.key, zlib.crc32(record.key) % partitions)
                partition = home
                if record.duplicate and record.expect is None and self.rng.random() < 0.3:
                    partition = self.rng.randrange(partitions)  # copies anywhere
                if cross:
                    partition = (home + 1) % partitions
                tp = TopicPartition(TOPIC, partition)
                self.positions[(partition, len(self.kafka.logs[tp]))] = record
                self.kafka.produce(partition, SimRecord(
                    record.key, record.value, int(self.world.now * 1000)))

            self.world.at(self.world.now + times[index], publish)

    def schedule_faults(self) -> None:
        scenario = self.scenario
        horizon = scenario.produce_over_s + 30.0
        for _ in range(scenario.fault_count if scenario.faults else 0):
            kind = self.rng.choice(scenario.faults)
            when = self.world.now + self.rng.uniform(1.0, horizon)
            self.world.at(when, lambda kind=kind: self.fault(kind))

    def fault(self, kind: str) -> None:
        """One fault now; "a+b" is a combination: b follows a within seconds (faults come
        together in production: a crash during a database stall during a rebalance)."""
        self.events.append(f"{self.world.now:.3f} {kind}")
        if "+" in kind:
            first, rest = kind.split("+", 1)
            self.fault(first)
            self.world.after(self.rng.uniform(0.5, 6.0), lambda: self.fault(rest))
            return
        getattr(self, f"_{kind}")()

    def _target(self) -> WorkerRun | None:
        alive = sorted(name for name, run in self.workers.items()
                       if run.process.alive and not run.task.done())
        return self.workers[self.rng.choice(alive)] if alive else None

    def _for_a_while(self, low: float, high: float, end: Callable[[], None]) -> None:
        self.world.after(self.rng.uniform(low, high), end)

    def _kill(self) -> None:
        if run := self._target():
            run.process.kill()
            self._for_a_while(0.5, 25.0, lambda: self.start_worker(run.name))

    def _term(self) -> None:
        if run := self._target():
            run.process.call_at(self.world.now, run.worker.stopping.set)
            self._restart_when_done(run.name, self.rng.uniform(0.0, 5.0))

    def _pause(self) -> None:
        if run := self._target():
            process = run.process
            process.paused = True
            self._for_a_while(2.0, 30.0, lambda: setattr(process, "paused", False))

    def _db_freeze(self) -> None:
        self.node.freeze()
        self._for_a_while(2.0, 30.0, self.node.thaw)

    def _db_slow(self) -> None:
        self.node.slow = True
        self._for_a_while(5.0, 40.0, lambda: setattr(self.node, "slow", False))

    def _write_errors(self) -> None:
        self.node.write_errors = True
        self._for_a_while(10.0, 60.0, lambda: setattr(self.node, "write_errors", False))

    def _db_crash(self) -> None:
        self.node.crash_coordinator(self.rng.uniform(0.2, 3.0))

    def _db_kill(self) -> None:
        # A Cassandra or ScyllaDB node takes longer than this to start (commitlog replay).
        self.node.kill(self.rng.uniform(10.0, 40.0))

    def _kafka_freeze(self) -> None:
        self.kafka.freeze()
        self._for_a_while(2.0, 25.0, self.kafka.thaw)

    def _add_partition(self) -> None:
        self.kafka.add_partition()

    def _db_cut(self) -> None:
        if run := self._target():
            name = run.process.name
            self.node.cut_off(name)
            self._for_a_while(3.0, 40.0, lambda: self.node.heal(name))

    def _lease_errors(self) -> None:
        self.node.lease_errors = True
        self._for_a_while(3.0, 20.0, lambda: setattr(self.node, "lease_errors", False))

    def _restart_when_done(self, name: str, delay: float) -> None:
        run = self.workers[name]

        def check() -> None:
            if run.task.done() or not run.process.alive:
                self.world.after(delay, lambda: self.start_worker(name))
            else:
                self.world.after(0.5, check)

        self.world.after(0.5, check)

    # -- running it ------------------------------------------------------------------------

    def run(self) -> None:
        world = self.world

        def virtual_time(**_: Any) -> Callable[..., Any]:
            def stamp(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
                event["vt"] = round(world.now - 1_700_000_000, 3)
                return event
            return stamp

        with mock.patch.object(structlog.processors, "TimeStamper", virtual_time):
            logs.configure(LOG_LEVEL, "json", stream=self.log)
        for index in range(self.scenario.workers):
            self.start_worker("ab"[index])
        self.node.start_commitlog_sync()
        self.engine()
        self.schedule_faults()
        quiet_after = self.world.now + self.scenario.produce_over_s + 75.0
        self.world.run_until(lambda: self.world.now > quiet_after and self.caught_up(),
                             limit_s=4000.0)
        if self.scenario.replay:
            self.replay()
        self.stop_all()
        # Whatever the batchlog still holds lands before anyone looks.
        horizon = max(self.world.now + 20.0, self.node.replay_until + 1.0)
        self.world.run_until(lambda: self.world.now > horizon, limit_s=60.0)

    def caught_up(self) -> bool:
        """Every record produced and committed past, and the database confirms those
        commits (after a node lost acknowledged writes, a writer re-reads the difference:
        Kafka's commit alone says nothing of the database)."""
        ends = self.kafka.ends()
        if not (len(self.positions) == sum(ends.values()) >= len(self.records) and all(
                self.kafka.committed.get(tp, 0) >= end for tp, end in ends.items())):
            return False
        confirmed = {stream: position for name, stream, position, _ in
                     self.node.db.select("progress", ("writer",)) if name == "committed"}
        return all(confirmed.get(f"{tp.topic}:{tp.partition}", -1) >= offset
                   for tp, offset in self.kafka.committed.items() if offset > 0)

    def replay(self) -> None:
        """`settler replay --from-offset 0`: stop the workers, rewind, start them again."""
        self.stop_all()
        # As `settler replay` does: remember where the group was, then rewind it.
        self.node.db.apply(
            Mutation("progress", ("writer",), ("committed", f"{tp.topic}:{tp.partition}"),
                     (("position", offset), ("epoch", None)), 10**17)
            for tp, offset in self.kafka.committed.items())
        self.kafka.committed.clear()
        self.events.append(f"{self.world.now:.3f} replay from 0")
        for name in sorted(self.workers):
            self.start_worker(name)
        self.world.run_until(self.caught_up, limit_s=2000.0)

    def stop_all(self) -> None:
        runs = [run for run in self.workers.values()
                if run.process.alive and not run.task.done()]
        for run in runs:
            run.process.paused = False
            run.process.call_at(self.world.now, run.worker.stopping.set)
        self.world.run_until(lambda: all(run.task.done() for run in runs), limit_s=120.0)

    # -- what must hold ----------------------------------------------------------------------

    def check(self) -> None:
        assert self.world.unhandled == [], f"unhandled errors: {self.world.unhandled[:3]}"
        assert all(code == 0 for _, code in self.exit_codes), (
            f"a worker exited non-zero: {self.exit_codes}")
        check_balances(self.node.db, self.records)
        check_records(self.node.db, self.positions)
        check_dead_letters(self.kafka, self.positions, replayed=self.scenario.replay)

    def describe(self) -> str:
        return "\n".join([repr(self.scenario), "events:", *self.events[-40:],
                          "log tail:", *list(self.log.lines)[-60:]])


def check_balances(db: SimDb, records: list[SampleRecord]) -> None:
    """Every row equals the model's (each valid event once), and no other row exists."""
    expected = expected_balances(REGISTRY, records)
    actual = db.balances()
    got = {key: row[:3] for key, row in actual.items()}
    want = {key: (row.available, row.frozen, row.version) for key, row in expected.items()}
    wrong = {key: (got.get(key), want.get(key)) for key in set(got) | set(want)
             if got.get(key) != want.get(key)}
    assert not wrong, f"{len(wrong)} rows differ (stored, model): {dict(list(wrong.items())[:5])}"
    for key, row in expected.items():
        assert actual[key][3] in row.times, f"row {key}: updated_at of no event of its own"


def check_records(db: SimDb, positions: dict[tuple[int, int], SampleRecord]) -> None:
    """Each valid id is claimed and recorded once, with its content's digest and a
    position that holds it; no other id is."""
    valid: dict[tuple[bool, int], tuple[bytes, set[str]]] = {}
    for (partition, offset), record in positions.items():
        if record.expect is None:
            event = decode(record.value)
            assert not isinstance(event, Rejected)
            key = (isinstance(event, Trade), event.event_id)
            fingerprint, sources = valid.setdefault(key, (digest(event), set()))
            sources.add(f"{TOPIC}:{partition}:{offset}")
    for is_trade in (True, False):
        claims = db.claims(is_trade)
        assert sorted(claims) == sorted(i for t, i in valid if t is is_trade)
        records = db.records(is_trade)
        assert sorted(records) == sorted(claims), "a settled id without its record"
        for event_id, (fingerprint, source) in records.items():
            want, sources = valid[(is_trade, event_id)]
            assert fingerprint == want, f"id {event_id}: recorded content is not the valid one"
            assert source in sources, f"id {event_id}: recorded from {source}, which lacks it"


def check_dead_letters(kafka: SimKafka, positions: dict[tuple[int, int], SampleRecord], *,
                       replayed: bool) -> None:
    """As a read_committed consumer sees the dead-letter topic: each invalid record
    exactly once with its reason (a replay may add copies marked settler.ops.replay)."""
    expected = Counter(
        (f"{TOPIC}/{partition}/{offset}", record.expect)
        for (partition, offset), record in positions.items() if record.expect is not None)
    seen: Counter[tuple[str, str]] = Counter()
    replays: Counter[tuple[str, str]] = Counter()
    for letter in kafka.dead_letters:
        headers = {key: value.decode() for key, value in letter.headers}
        key = (headers["settler.source"], headers["settler.reason"])
        (replays if headers.get("settler.ops.replay") else seen)[key] += 1
    assert seen == expected, (f"dead letters differ: missing {expected - seen}, "
                              f"extra {seen - expected}")
    if not replayed:
        assert not replays, f"replay-marked dead letters without a replay: {replays}"
    else:
        assert set(replays) <= set(expected)


def run_scenario(scenario: Scenario, note: Callable[[str], Any] = print) -> Simulation:
    simulation = Simulation(scenario)
    try:
        simulation.run()
        simulation.check()
    except BaseException:
        note(simulation.describe())
        raise
    return simulation
