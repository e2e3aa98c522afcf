"""Deterministic simulation of the worker against a simulated Cassandra (TigerBeetle-style):
exactly-once (ARCHITECTURE.md "Why exactly once", SPEC section 4) under writer crashes,
claims and LOGGED batches cut at a crash, batches acknowledged out of order, eviction and
reloads, duplicates (also across partitions), conflicts, malformed records and replays.

The simulated writer re-enacts settler/worker.py's WriterSession step by step (`_settle`:
track, decode, effect; `_load`; `_plan`; `_issue`; `_land`; `_commit`) and drives the REAL
`Ledger`, `decode`, `Offsets`, `SettlementDb.claims_batch`, `SettlementDb.settlement_batch`,
`SettlementDb.load_user` and `SettlementDb.settled`; only the I/O is simulated
(tests/unit/simdb.py). One seeded `random.Random` decides every interleaving and fault, so an
example is deterministic and replays exactly (a failing one is printed as `Scenario(...)`).
The expected balances come from the independent model in tests/model.py.

The world: N partitions (records placed by key hash, plus re-sends); fetches take a random
slice of each partition, interleaved; the writer loads what it lacks, plans, groups Writes
into groups of 1..8 events. Per group (worker._issue / worker._land) the UNLOGGED batch of
its id claims is sent at once; its LOGGED settlement batch is sent only when its own claims
and those of every earlier group are acknowledged. The database applies sent batches and
acknowledges them in any order; commits happen at random moments. A crash discards the
writer's memory and its unacknowledged work: each claims batch in flight is lost, applied,
or cut (some id_claims partitions applied, the others never: no batchlog); each LOGGED
batch in flight is lost, applied, or cut (some table partitions applied, the others by the
batchlog later); a LOGGED batch not sent yet is never sent. The next writer took over an
expired lease, so it waits until the batchlog has replayed everything (worker `_lead`,
SETTLER_TAKEOVER_WAIT_S) before it reads: the cut batches of every earlier writer land
first. `takeover_wait=False` lets them land at random later moments instead, under the next
writers, whose timestamps are all higher: harmless for one crashed writer, a lost event for
two in a row (a strict xfail shows why the wait exists).

Found and fixed with it: a cross-partition copy applied twice after a crash (ids are now
claimed before their effect can exist); an event settled in the balances but never recorded
when the batch holding its record was lost under a later one (a re-read at its own position
re-writes the record); late claims of two crashed writers handing an id to a copy (claims are
re-written on every write). Their reproductions below now pass.

More examples than the default: SETTLER_SIM_EXAMPLES=1500 pytest tests/unit/test_simulation.py
"""

from __future__ import annotations

import os
import random
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, event, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from settler.config import DEFAULT_REGISTRY
from settler.db import ID_BUCKET_BITS, id_bucket
from settler.events import Event, Rejected, Trade, decode, digest
from settler.ledger import Ledger, Position, Reject, Skip, Write
from settler.offsets import Offsets
from settler.registry import load_registry
from settler.sample import SampleRecord, StreamShape, generate
from settler.settlement import Effect
from tests.model import expected_balances
from tests.unit.simdb import Mutation, SimDb, batch_mutations, claim_mutations

REGISTRY = load_registry(DEFAULT_REGISTRY)
TOPIC = "sim.events"
FETCH_MAX = 10  # records per partition per fetch, at most
MAX_IN_FLIGHT = 8  # batches and dead letters (the worker's SETTLER_MAX_IN_FLIGHT)
MAX_BATCH_EVENTS = 8
FETCH_CHANCE = 0.7  # per step of the world: the writer fetches (else something else happens)
BACKGROUND_CHANCE = 0.15  # between two steps of the writer, something else happens
EXAMPLES = int(os.environ.get("SETTLER_SIM_EXAMPLES", "0")) or None


FATES = ("lost", "applied", "partial", "partial")  # of a LOGGED batch in flight at a crash
CLAIM_FATES = ("lost", "applied", "cut")  # of a claims batch in flight at a crash


class Crashed(Exception):
    """The writer process died: its memory and its unacknowledged work are gone."""


@dataclass(frozen=True, slots=True)
class Item:
    """One fetched record on its way through the pipeline (worker.Item)."""

    partition: int
    offset: int
    record: SampleRecord
    event: Event | Rejected
    effect: Effect | Rejected

    @property
    def position(self) -> Position:
        return Position(TOPIC, self.partition, self.offset)


@dataclass(eq=False)
class Batch:
    """One group in flight (worker._land): the UNLOGGED batch of its id claims, sent at
    once, then its LOGGED settlement batch, sent only once these claims and those of every
    earlier group are acknowledged (`Session.sent`). Both have the group's timestamp."""

    group: list[tuple[Item, Write]]
    claims: list[Mutation]  # empty: no first sight of an id, no claims batch (None)
    mutations: list[Mutation]
    claims_applied: bool = False  # applied by the database
    claims_acked: bool = False  # ... and acknowledged: the worker knows they are durable
    delivered: bool = False  # the LOGGED batch applied; its acknowledgement is pending

    def __post_init__(self) -> None:
        if not self.claims:
            self.claims_applied = self.claims_acked = True


@dataclass(frozen=True)
class Stream:
    records: list[SampleRecord]  # as generated: the model's input
    partitions: list[list[SampleRecord]]  # what Kafka holds, offset = index

    def positions(self) -> list[tuple[Position, SampleRecord]]:
        return [(Position(TOPIC, p, o), record)
                for p, records in enumerate(self.partitions) for o, record in enumerate(records)]


def make_stream(shape: StreamShape, partitions: int, cross_copies: int, rng: random.Random
                ) -> Stream:
    """Records spread over partitions by key hash (re-sends land after their original, in
    its partition); `cross_copies` valid records are also re-sent into another partition,
    at any offset there."""
    records = generate(REGISTRY, shape)
    lanes: list[list[SampleRecord]] = [[] for _ in range(partitions)]
    for record in records:
        lanes[zlib.crc32(record.key) % partitions].append(record)
    valid = [record for record in records if record.expect is None]
    for _ in range(cross_copies if partitions > 1 else 0):
        original = rng.choice(valid)
        home = zlib.crc32(original.key) % partitions
        lane = lanes[rng.choice([p for p in range(partitions) if p != home])]
        lane.insert(rng.randint(0, len(lane)),
                    SampleRecord(original.key, original.value, None, duplicate=True))
    return Stream(records, lanes)


@dataclass
class Session:
    """One writer tenure (worker.WriterSession): fresh memory, reading from the committed
    offsets of the consumer group."""

    sim: Sim
    ledger: Ledger = field(init=False)
    offsets: Offsets[int] = field(default_factory=Offsets)
    fetched: list[int] = field(init=False)  # next offset to fetch, per partition
    batches: list[Batch] = field(default_factory=list)
    letters: list[tuple[Position, str]] = field(default_factory=list)  # being produced
    loaded: set[int] = field(default_factory=set)  # users read from the database

    def __post_init__(self) -> None:
        self.ledger = Ledger(REGISTRY, self.sim.max_rows, self.sim.max_ids)
        self.fetched = [self.sim.committed.get(p, 0)
                        for p in range(len(self.sim.stream.partitions))]

    @property
    def rng(self) -> random.Random:
        return self.sim.rng

    def in_flight(self) -> int:
        return len(self.batches) + len(self.letters)

    def can_fetch(self) -> bool:
        return self.in_flight() < MAX_IN_FLIGHT and any(
            offset < len(records)
            for offset, records in zip(self.fetched, self.sim.stream.partitions, strict=True))

    def done(self) -> bool:
        return not self.in_flight() and not self.can_fetch()

    # -- fetch -> settle (worker._settle) --------------------------------------------------

    def fetch(self) -> list[tuple[int, int]]:
        """A random slice of each partition, in offset order within a partition."""
        partitions = self.sim.stream.partitions
        counts = [self.rng.randint(0, min(FETCH_MAX, len(records) - start))
                  for start, records in zip(self.fetched, partitions, strict=True)]
        if not any(counts):
            counts[next(p for p, records in enumerate(partitions)
                        if self.fetched[p] < len(records))] = 1
        lanes = [p for p, count in enumerate(counts) for _ in range(count)]
        self.rng.shuffle(lanes)  # partitions interleave; each stays in offset order
        order = []
        for p in lanes:
            order.append((p, self.fetched[p]))
            self.fetched[p] += 1
        return order

    def settle(self) -> None:
        items: list[Item] = []
        for p, offset in self.fetch():
            self.offsets.track(p, offset)
            record = self.sim.stream.partitions[p][offset]
            event = decode(record.value)
            effect = event if isinstance(event, Rejected) else self.ledger.effect(event)
            items.append(Item(p, offset, record, event, effect))
        self.load(items)
        group: list[tuple[Item, Write]] = []
        size = self.rng.randint(1, MAX_BATCH_EVENTS)
        for item in items:
            self.sim.background()
            write = self.plan(item)
            if write is not None:
                group.append((item, write))
                if len(group) >= size:
                    self.issue(group)
                    group, size = [], self.rng.randint(1, MAX_BATCH_EVENTS)
        if group:
            self.issue(group)
        self.ledger.trim()

    def load(self, items: list[Item]) -> None:
        """worker._load: rows of users not cached, settled records of ids not remembered
        (one slice per id bucket); the reads run concurrently with everything else."""
        events = [item.event for item in items if not isinstance(item.event, Rejected)]
        effects = [item.effect for item in items if isinstance(item.effect, Effect)]
        ranges: dict[tuple[bool, int], list[int]] = defaultdict(list)
        for is_trade, event_id in self.ledger.unknown_ids(events):
            ranges[(is_trade, id_bucket(event_id))].append(event_id)
        reads: list[Callable[[], None]] = [
            self._read_ids(is_trade, bucket, ids) for (is_trade, bucket), ids in ranges.items()
        ] + [self._read_user(user_id) for user_id in sorted(self.ledger.missing_users(effects))]
        self.rng.shuffle(reads)
        for read in reads:
            self.sim.background()
            read()

    def _read_ids(self, is_trade: bool, bucket: int, ids: list[int]) -> Callable[[], None]:
        def read() -> None:
            self.ledger.add_settled(
                is_trade, self.sim.db.settled(is_trade, bucket, min(ids), max(ids)))
        return read

    def _read_user(self, user_id: int) -> Callable[[], None]:
        def read() -> None:
            if user_id in self.loaded:
                self.sim.stats["reloads"] += 1  # evicted since
            self.loaded.add(user_id)
            self.ledger.add_user(user_id, self.sim.db.load_user(user_id))
        return read

    def plan(self, item: Item) -> Write | None:
        """worker._plan: skip now, dead-letter, or return the rows to write."""
        if isinstance(item.event, Rejected):
            self.letters.append((item.position, item.event.reason))
            return None
        plan = self.ledger.plan(item.event, item.effect, item.position)
        if isinstance(plan, Skip):
            self.offsets.settle(item.partition, item.offset)
            return None
        if isinstance(plan, Reject):
            self.letters.append((item.position, plan.reason))
            return None
        return plan

    def issue(self, group: list[tuple[Item, Write]]) -> None:
        """worker._issue: one timestamp above every earlier one; the claims batch of the
        group's first sights of ids (sent at once) and its ONE LOGGED batch (sent by
        `_land` once the chain of claims allows it: `sent`)."""
        writes = [write for _, write in group]
        timestamp = self.sim.timestamp()
        claims = claim_mutations(writes, timestamp=timestamp)
        assert len(claims) == len(writes)
        mutations = batch_mutations(writes, fee_account=REGISTRY.fee_account,
                                    timestamp=timestamp)
        self.batches.append(Batch(group, claims, mutations))

    def sent(self) -> list[Batch]:
        """The groups whose LOGGED batch is sent (worker._land: own claims durable, then
        `await after`, the chain of every earlier group's claims): the groups in issue
        order up to the first one whose claims are not acknowledged. A group leaves
        `batches` only once its LOGGED batch is acknowledged, so an earlier group that is
        gone had its claims acknowledged."""
        sent = []
        for batch in self.batches:
            if not batch.claims_acked:
                break
            sent.append(batch)
        return sent

    # -- what happens meanwhile ------------------------------------------------------------

    def deliverable(self) -> list[tuple[Batch, bool]]:
        """(group, is its claims batch) of what is sent and not applied yet."""
        return [(batch, True) for batch in self.batches if not batch.claims_applied] + [
            (batch, False) for batch in self.sent() if not batch.delivered]

    def deliver(self) -> None:
        """The database applies a sent batch, claims or LOGGED, in any order; its
        acknowledgement is still on the way."""
        batch, claims = self.rng.choice(self.deliverable())
        if claims:
            self.sim.db.apply(batch.claims)
            batch.claims_applied = True
        else:
            self.sim.db.apply(batch.mutations)
            batch.delivered = True

    def acknowledgeable(self) -> list[tuple[Batch | None, bool]]:
        """(group, is its claims batch) of what is applied and not acknowledged yet, and
        (None, False) per dead letter being produced."""
        return [(batch, True) for batch in self.batches
                if batch.claims_applied and not batch.claims_acked] + [
            (batch, False) for batch in self.batches if batch.delivered] + [
            (None, False) for _ in self.letters]

    def acknowledge(self) -> None:
        """In any order: a claims batch acknowledged (worker._land goes on to wait for the
        earlier groups' claims, then sends the LOGGED batch), a LOGGED batch acknowledged
        (worker._land: landed, offsets settled), or a dead letter acknowledged."""
        batch, claims = self.rng.choice(self.acknowledgeable())
        if batch is None:
            position, reason = self.letters.pop(self.rng.randrange(len(self.letters)))
            self.sim.dead_letters.append((position, reason))
            self.offsets.settle(position.partition, position.offset)
        elif claims:
            batch.claims_acked = True
        else:
            self.batches.remove(batch)
            for item, write in batch.group:
                self.ledger.landed(write)
                self.offsets.settle(item.partition, item.offset)

    def commit(self) -> None:
        """worker._commit: only what Offsets.commit_ready says."""
        ready = self.offsets.commit_ready()
        for partition, offset in ready.items():
            assert offset > self.sim.committed.get(partition, 0), "a commit went backwards"
        self.sim.committed.update(ready)
        self.offsets.committed(ready)

    def die(self) -> list[list[Mutation]]:
        """A crash. Each claims batch in flight (sent, not applied) was lost, applied, or
        cut: UNLOGGED, its id_claims partitions are applied or not each on its own, and
        what is not applied never is (no batchlog). Each LOGGED batch in flight was lost,
        applied, or applied partly with the rest replayed from the batchlog later. A
        LOGGED batch still waiting for claims was never sent. Returns the rests of the
        cut LOGGED batches (partition shares) for the batchlog."""
        sent = self.sent()  # decided by the acknowledgements, none of which comes now
        rests: list[list[Mutation]] = []
        for batch in self.batches:
            if not batch.claims_applied:
                self._cut_claims(batch)
            if batch not in sent:
                self.sim.stats["batch_unsent"] += 1
            elif not batch.delivered:
                rests += self._cut_batch(batch)
        for position, reason in self.letters:
            if self.rng.random() < 0.5:  # produced, acknowledgement lost
                self.sim.dead_letters.append((position, reason))
        return rests

    def _cut_claims(self, batch: Batch) -> None:
        fate = self.rng.choice(CLAIM_FATES)
        self.sim.stats[f"claims_{fate}"] += 1
        if fate == "applied":
            self.sim.db.apply(batch.claims)
        elif fate == "cut":
            for part in _parts(batch.claims):
                if self.rng.random() < 0.5:
                    self.sim.db.apply(part)

    def _cut_batch(self, batch: Batch) -> list[list[Mutation]]:
        fate = self.rng.choice(FATES)
        self.sim.stats[f"batch_{fate}"] += 1
        rests = []
        if fate == "applied":
            self.sim.db.apply(batch.mutations)
        elif fate == "partial":
            for part in _parts(batch.mutations):
                if self.rng.random() < 0.5:
                    self.sim.db.apply(part)
                else:
                    rests.append(part)
        return rests


def _parts(mutations: list[Mutation]) -> list[list[Mutation]]:
    """A batch's shares per table partition, each applied atomically and in isolation."""
    parts: dict[object, list[Mutation]] = defaultdict(list)
    for mutation in mutations:
        parts[mutation.replica_key].append(mutation)
    return list(parts.values())


class Sim:
    """The world: the database, the consumer group's commits, the clock, the faults."""

    def __init__(self, stream: Stream, rng: random.Random, *, crashes: int,
                 max_rows: int = 20, max_ids: int = 30, crash_weight: float = 0.2,
                 late_weight: float = 1.0, takeover_wait: bool = True,
                 late_crashes: int | None = None) -> None:
        self.stream = stream
        self.rng = rng
        self.max_rows = max_rows
        self.max_ids = max_ids
        self.crashes = crashes
        self.crash_weight = crash_weight
        self.late_weight = late_weight
        self.takeover_wait = takeover_wait
        self.late_crashes = late_crashes  # without the wait: crashes whose rests land late
        self.crashes_left = crashes
        self.db = SimDb()
        # Per crash, the partition shares of the LOGGED batches it cut that the batchlog
        # applies later: before the next writer reads (the takeover wait), or without the
        # wait at random later moments, while later writers run; oldest batches first.
        self.late: list[list[list[Mutation]]] = []
        self.committed: dict[int, int] = {}
        self.dead_letters: list[tuple[Position, str]] = []
        self.clock = 0
        self.stats: Counter[str] = Counter()
        self.session = Session(self)

    def timestamp(self) -> int:
        """Strictly increasing across writers (the lease's ts_ceiling)."""
        self.clock += 1
        return self.clock

    def run(self) -> None:
        """Until every record of every partition is read and settled."""
        while not self.session.done():
            try:
                if self.session.can_fetch() and self.rng.random() < FETCH_CHANCE:
                    self.stats["fetches"] += 1
                    self.session.settle()
                else:
                    self.background(always=True)
            except Crashed:
                self.stats["crashes"] += 1
                self.take_over()

    def take_over(self) -> None:
        """A new writer takes over the lease the crashed one let expire (worker._lead):
        with the takeover wait it reads nothing until the batchlog has replayed every
        batch the crashed writers left behind."""
        if self.takeover_wait:
            self.flush()
        self.session = Session(self)

    def replay(self) -> None:
        """`settler replay` to offset 0 (or a new group): a fresh writer reads it all again.
        The writer before it finished its work and released the lease: no wait."""
        self.committed = {}
        self.crashes_left = self.crashes
        self.session = Session(self)
        self.run()

    def flush(self) -> None:
        """The batchlog replays whatever is left."""
        for rests in self.late:
            for part in rests:
                self.stats["late_parts"] += 1
                self.stats["late_cells_lost"] += self.db.apply(part)
        self.late = []

    def background(self, always: bool = False) -> None:
        """What may happen while the writer is between two steps of its own."""
        if not always and self.rng.random() >= BACKGROUND_CHANCE:
            return
        session = self.session
        actions: list[tuple[float, Callable[[], None]]] = [(1.0, session.commit)]
        if session.deliverable():
            actions.append((3.0, session.deliver))
        if session.acknowledgeable():
            actions.append((3.0, session.acknowledge))
        if self.late:
            actions.append((self.late_weight, self.replay_late))
        if self.crashes_left:  # more likely with work in flight, the interesting moments
            actions.append((self.crash_weight * (1 + session.in_flight()), self.crash))
        weights, steps = zip(*actions, strict=True)
        self.rng.choices(steps, weights)[0]()

    def replay_late(self) -> None:
        self.stats["late_parts"] += 1
        rests = self.late[0]
        part = rests.pop(self.rng.randrange(len(rests)))
        if not rests:
            del self.late[0]
        self.stats["late_cells_lost"] += self.db.apply(part)

    def crash(self) -> None:
        self.crashes_left -= 1
        rests = self.session.die()
        if rests:
            if self.takeover_wait or self.late_crashes is None or self.late_crashes > 0:
                self.late.append(rests)
                self.stats["late_crashes"] += 1
                if not self.takeover_wait and self.late_crashes is not None:
                    self.late_crashes -= 1
            else:  # without the wait, beyond `late_crashes`: landed before anyone reads
                self.db.apply(m for part in rests for m in part)
        raise Crashed


# -- what must hold -----------------------------------------------------------------------

def check_balances(db: SimDb, stream: Stream) -> None:
    """Every row equals the model's (each valid event once), and no other row exists."""
    expected = expected_balances(REGISTRY, stream.records)
    actual = db.balances()
    assert {key: row[:3] for key, row in actual.items()} == {
        key: (row.available, row.frozen, row.version) for key, row in expected.items()
    }
    for key, row in expected.items():
        assert actual[key][3] in row.times, f"row {key}: updated_at of no event of its own"


def check_records(db: SimDb, stream: Stream, *, every_record: bool = True) -> None:
    """Each valid id is claimed once, with its content's digest and a position holding it;
    no other id is. Each valid id is recorded (trades / balance_events) once, with the
    digest and the position of its claim (the position that settled it owns it); no other
    id is. `every_record=False`: a record may be missing, never wrong."""
    valid: dict[tuple[bool, int], tuple[bytes, set[str]]] = {}
    for position, record in stream.positions():
        if record.expect is None:
            event = decode(record.value)
            assert not isinstance(event, Rejected)
            key = (isinstance(event, Trade), event.event_id)
            fingerprint, sources = valid.setdefault(key, (digest(event), set()))
            assert digest(event) == fingerprint
            sources.add(str(position))
    for is_trade in (True, False):
        claims = db.claims(is_trade)
        assert sorted(claims) == sorted(i for t, i in valid if t is is_trade)
        for event_id, (fingerprint, source) in claims.items():
            want, sources = valid[(is_trade, event_id)]
            assert fingerprint == want, f"id {event_id}: claimed content is not the valid one"
            assert source in sources, f"id {event_id}: claimed by {source}, which lacks it"
        stored = db.records(is_trade)
        for event_id, record in stored.items():
            assert record == claims.get(event_id), f"id {event_id}: record is not its claim's"
        if every_record:
            missing = sorted(set(claims) - set(stored))
            assert not missing, f"settled ids without a record: {missing}"


def check_dead_letters(sim: Sim, exactly: int | None = None) -> None:
    """Each invalid record dead-lettered with its reason (at least once), nothing else."""
    expected = {(position, record.expect) for position, record in sim.stream.positions()
                if record.expect is not None}
    assert set(sim.dead_letters) == expected
    if exactly is not None:
        assert Counter(Counter(sim.dead_letters).values()) == (
            Counter({exactly: len(expected)}) if expected else Counter())


def check_everything(sim: Sim, *, every_record: bool = True) -> None:
    check_balances(sim.db, sim.stream)
    check_records(sim.db, sim.stream, every_record=every_record)
    if currently_in_test_context():  # --hypothesis-show-statistics: what the runs covered
        stats = sim.stats
        event(f"crashes: {_bucket(stats['crashes'])}")
        event("batches in flight at crashes: "
              f"{_bucket(sum(stats[f'batch_{fate}'] for fate in FATES))}")
        for fate in FATES:
            if stats[f"batch_{fate}"]:
                event(f"a LOGGED batch in flight at a crash was {fate}")
        for fate in CLAIM_FATES:
            if stats[f"claims_{fate}"]:
                event(f"a claims batch in flight at a crash was {fate}")
        if stats["batch_unsent"]:
            event("a LOGGED batch waiting for claims at a crash")
        if stats["late_cells_lost"]:
            event("a late batch part lost cells to newer ones")
        if stats["reloads"]:
            event("users evicted and re-read")


def _bucket(count: int) -> str:
    return "0" if not count else "1-3" if count <= 3 else "4-9" if count <= 9 else "10+"


# -- the properties -----------------------------------------------------------------------

ID_BUCKET_SIZE = 1 << ID_BUCKET_BITS


@dataclass(frozen=True)
class Scenario:
    """Everything one example is made of: `Scenario(...).simulate()` replays it exactly."""

    events: int = 100
    users: int = 8
    zipf: float = 0.0
    duplicate_rate: float = 0.05
    malformed_rate: float = 0.05
    stream_seed: int = 1
    partitions: int = 2
    cross_copies: int = 0  # valid records also re-sent into another partition
    schedule: int = 0  # seeds every interleaving and fault
    crashes: int = 0  # writer crashes, at most, per pass over the stream
    max_rows: int = 20
    max_ids: int = 30
    straddle: bool = False  # ids start just below an id bucket edge: two buckets per kind
    late_weight: float = 1.0  # without the wait: how soon the batchlog replays
    takeover_wait: bool = True  # worker._lead: no read before the batchlog has landed
    late_crashes: int | None = None  # without the wait: crashes whose rests land late

    def stream(self) -> Stream:
        shape = StreamShape(
            events=self.events, users=self.users, zipf=self.zipf,
            duplicate_rate=self.duplicate_rate, malformed_rate=self.malformed_rate,
            seed=self.stream_seed,
        )
        if self.straddle:
            shape.first_event_id = ID_BUCKET_SIZE - self.events // 4
            shape.first_trade_id = 245 * ID_BUCKET_SIZE - self.events // 8
        return make_stream(shape, self.partitions, self.cross_copies,
                           random.Random(self.stream_seed + 1))

    def simulate(self, *, every_record: bool = True) -> Sim:
        """One pass over the stream; then checks the database as it will be once the
        batchlog has replayed what the crashes left behind (on a copy)."""
        if currently_in_test_context():
            note(repr(self))  # hypothesis shows this for a failing example
        stream = self.stream()
        sim = Sim(stream, random.Random(self.schedule), crashes=self.crashes,
                  max_rows=self.max_rows, max_ids=self.max_ids, late_weight=self.late_weight,
                  takeover_wait=self.takeover_wait, late_crashes=self.late_crashes)
        sim.run()
        settled = sim.db.copy()
        for rests in sim.late:
            for part in rests:
                settled.apply(part)
        check_balances(settled, stream)
        check_records(settled, stream, every_record=every_record)
        return sim


NONE: st.SearchStrategy[int] = st.just(0)
SOON: st.SearchStrategy[float] = st.just(1.0)


def scenarios(*, crashes: st.SearchStrategy[int] = NONE,
              cross_copies: st.SearchStrategy[int] = NONE,
              late_weight: st.SearchStrategy[float] = SOON,
              takeover_wait: bool = True,
              late_crashes: int | None = None) -> st.SearchStrategy[Scenario]:
    return st.builds(
        Scenario,
        events=st.integers(30, 200),
        users=st.integers(3, 12),
        zipf=st.sampled_from([0.0, 1.2]),
        duplicate_rate=st.sampled_from([0.0, 0.05, 0.15]),
        malformed_rate=st.sampled_from([0.0, 0.05, 0.1]),
        stream_seed=st.integers(0, 2**16),
        partitions=st.integers(2, 3),
        cross_copies=cross_copies,
        schedule=st.integers(0, 2**32),
        crashes=crashes,
        max_rows=st.integers(4, 24),
        max_ids=st.integers(4, 40),
        straddle=st.booleans(),
        late_weight=late_weight,
        takeover_wait=st.just(takeover_wait),
        late_crashes=st.just(late_crashes),
    )


# Every valid id must have its record, crashes or not.
EVERY_RECORD_UNDER_CRASHES = True


SIMULATION = settings(
    max_examples=EXAMPLES or 150, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no explain phase: slow here
)


@SIMULATION
@given(scenarios())
def test_plain_run_settles_each_event_once(scenario: Scenario) -> None:
    """No faults: claims and batches land out of order, commits at random moments,
    eviction and reloads under small bounds, the stream's own duplicates, conflicts and bad
    records."""
    sim = scenario.simulate()
    assert not sim.late
    check_everything(sim)
    check_dead_letters(sim, exactly=1)


@SIMULATION
@given(scenarios(crashes=st.integers(1, 5)))
def test_exactly_once_under_crashes_partial_batches_and_replay(scenario: Scenario) -> None:
    """Crashes anywhere (mid-fetch, mid-load, between batches, between a group's claims and
    its batch); each claims batch in flight at a crash lost, applied or cut, each LOGGED
    batch in flight lost, applied or cut, each one waiting for claims never sent; restarts
    from the committed offsets after the takeover wait (every crash's cut batches have
    landed); then a replay of everything from offset 0 by a new group, crashing again."""
    sim = scenario.simulate(every_record=EVERY_RECORD_UNDER_CRASHES)
    sim.replay()
    sim.flush()
    check_everything(sim, every_record=EVERY_RECORD_UNDER_CRASHES)
    check_dead_letters(sim)


@SIMULATION
@given(scenarios(cross_copies=st.integers(1, 40)))
def test_duplicates_across_partitions_without_crashes(scenario: Scenario) -> None:
    """Valid records also re-sent into another partition, before or after the original:
    the first copy planned settles, every other is a duplicate; then a full replay."""
    sim = scenario.simulate()
    sim.replay()
    check_everything(sim)
    check_dead_letters(sim, exactly=2)


@SIMULATION
@given(scenarios(cross_copies=st.integers(20, 80), crashes=st.integers(2, 8)))
def test_duplicates_across_partitions_under_crashes(scenario: Scenario) -> None:
    """SPEC section 4: exactly once with "duplicates anywhere in the stream" and "the worker
    killed at any instruction": valid records also re-sent into another partition, and the
    writer crashes with claims and batches in flight (ARCHITECTURE.md point 4: an effect
    exists only once its id's claim is durable)."""
    sim = scenario.simulate(every_record=EVERY_RECORD_UNDER_CRASHES)
    sim.replay()
    sim.flush()
    check_everything(sim, every_record=EVERY_RECORD_UNDER_CRASHES)
    check_dead_letters(sim)


@SIMULATION
@given(scenarios(cross_copies=st.integers(0, 40), crashes=st.integers(1, 5),
                 late_weight=st.sampled_from([0.2, 1.0]), takeover_wait=False,
                 late_crashes=1))
def test_without_the_takeover_wait_one_crashed_writers_late_batches_are_harmless(
        scenario: Scenario) -> None:
    """Should a batchlog replay come later than the takeover wait, for ONE crashed writer:
    the rests of its cut batches land at random later moments, under newer writers' cells
    (possibly during the replay); they lose where newer writers wrote, and complete rows
    nobody rewrote (ARCHITECTURE.md "Crash anywhere"). Other crashes' rests land before the
    next read. Two crashed writers' late rests: the strict xfail
    test_late_batches_of_two_crashed_writers_lose_no_event_without_the_takeover_wait."""
    sim = scenario.simulate(every_record=EVERY_RECORD_UNDER_CRASHES)
    sim.replay()
    sim.flush()
    check_everything(sim, every_record=EVERY_RECORD_UNDER_CRASHES)
    check_dead_letters(sim)


@settings(SIMULATION, phases=[Phase.explicit, Phase.generate])  # fails fast: no shrinking
@given(scenarios(crashes=st.integers(1, 5)))
@example(Scenario(events=68, users=3, duplicate_rate=0.0, stream_seed=0, schedule=0, crashes=1,
                  max_rows=4, max_ids=4))  # shrunk: ids 4, 5, 6, 8 and 9 never recorded
def test_every_settled_event_is_recorded_under_crashes(scenario: Scenario) -> None:
    """test_exactly_once_under_crashes_partial_batches_and_replay, requiring each valid
    event's record too."""
    sim = scenario.simulate()
    sim.replay()
    sim.flush()
    check_everything(sim)


# -- scripted cases: the bugs the simulation found, and what fixed them -------------------

def _deposit(event_id: int, amount: int) -> bytes:
    return (f'{{"type": "deposit", "event_id": {event_id}, "user_id": 10001, "asset_id": 1,'
            f' "amount": {amount}, "ts": 1700000000000}}').encode()


D7, D8 = _deposit(7, 5), _deposit(8, 3)  # two deposits to the same row (10001, BTC)


@dataclass
class Writer:
    """A writer session in slow motion: worker._load then Ledger.plan for one record at a
    time, and the real claims and settlement batches for what it plans."""

    db: SimDb
    ledger: Ledger = field(default_factory=lambda: Ledger(REGISTRY, 20, 30))

    def plan(self, value: bytes, partition: int, offset: int) -> Write | None:
        event = decode(value)
        assert not isinstance(event, Rejected)
        effect = self.ledger.effect(event)
        assert isinstance(effect, Effect)
        for is_trade, event_id in self.ledger.unknown_ids([event]):
            self.ledger.add_settled(
                is_trade, self.db.settled(is_trade, id_bucket(event_id), event_id, event_id))
        for user_id in self.ledger.missing_users([effect]):
            self.ledger.add_user(user_id, self.db.load_user(user_id))
        plan = self.ledger.plan(event, effect, Position(TOPIC, partition, offset))
        return plan if isinstance(plan, Write) else None

    def claims(self, write: Write | None, timestamp: int) -> list[Mutation]:
        return [] if write is None else claim_mutations([write], timestamp=timestamp)

    def batch(self, write: Write | None, timestamp: int) -> list[Mutation]:
        if write is None:
            return []
        return batch_mutations([write], fee_account=REGISTRY.fee_account, timestamp=timestamp)

    def settle(self, value: bytes, partition: int, offset: int, timestamp: int) -> None:
        """Plan; apply the claims, then the batch; acknowledge it."""
        write = self.plan(value, partition, offset)
        self.db.apply(self.claims(write, timestamp))
        self.db.apply(self.batch(write, timestamp))
        if write is not None:
            self.ledger.landed(write)


def _row(db: SimDb) -> tuple[int, int, int]:
    """(available, frozen, version) of the row both deposits touch."""
    available, frozen, version, _ = db.balances()[(10001, 1)]
    return available, frozen, version


def _owner(db: SimDb, event_id: int) -> tuple[str | None, str | None]:
    """(claim source, record source) of a balance event id."""
    claim = db.claims(False).get(event_id)
    record = db.records(False).get(event_id)
    return claim and claim[1], record and record[1]


def test_cut_batch_then_copy_in_another_partition_applies_once() -> None:
    """Formerly a bug (settled() read the records): a cut LOGGED batch left a row holding
    D7 and no record of id 7; a copy of D7 in another partition then looked new."""
    db = SimDb()
    # Writer 1 plans D7 at partition 1 offset 0: its claim is durable (acknowledged)
    # before the LOGGED batch is sent; it dies while that batch is being applied: the
    # user_balances partition has it, the balance_events partition not yet.
    first = Writer(db)
    write = first.plan(D7, 1, 0)
    db.apply(first.claims(write, timestamp=1))
    cut = first.batch(write, timestamp=1)
    db.apply(m for m in cut if m.table == "user_balances")
    assert _row(db) == (5, 0, 1)
    # Writer 2 fetches partition 0 first, where the engine re-sent D7: id 7 is claimed by
    # 1:0, a duplicate. Even without the takeover wait (the rest lands only now).
    writer = Writer(db)
    writer.settle(D7, 0, 0, timestamp=2)
    db.apply(m for m in cut if m.table != "user_balances")  # batchlog
    writer.settle(D7, 1, 0, timestamp=3)  # its own position: the row has it already
    assert _row(db) == (5, 0, 1), "D7 (5) applied twice"
    assert _owner(db, 7) == (f"{TOPIC}:1:0", f"{TOPIC}:1:0")


def test_lost_batch_under_a_pipelined_one_then_copy_in_another_partition_applies_once(
) -> None:
    """Formerly a bug: the row of a later pipelined batch carried D7, whose own batch (and
    record) was lost; a copy of D7 in another partition then looked new."""
    db = SimDb()
    # Writer 1 plans D7 (partition 1, offset 0) and D8 (offset 1) into two pipelined
    # groups; the second one's row (8, version 2) carries D7 too. The second LOGGED batch
    # is sent only once the claims of both groups are acknowledged. It dies: the first
    # LOGGED batch never reached the database, the second was applied.
    first = Writer(db)
    d7, d8 = first.plan(D7, 1, 0), first.plan(D8, 1, 1)
    db.apply(first.claims(d7, timestamp=1))
    db.apply(first.claims(d8, timestamp=2))
    lost = first.batch(d7, timestamp=1)
    db.apply(first.batch(d8, timestamp=2))
    assert lost and _row(db) == (8, 0, 2)
    # Writer 2 reads the copy of D7 in partition 0 first: id 7 is claimed by 1:0.
    writer = Writer(db)
    writer.settle(D7, 0, 0, timestamp=3)  # duplicate of 1:0
    writer.settle(D7, 1, 0, timestamp=4)  # its own position: the row has it already
    writer.settle(D8, 1, 1, timestamp=5)  # already in the row
    assert _row(db) == (8, 0, 2), "D7 (5) applied twice"


def test_lost_batch_under_a_pipelined_one_leaves_no_event_unrecorded() -> None:
    db = SimDb()
    # Writer 1 plans D7 (partition 1, offset 0) and D8 (offset 1) into two pipelined
    # groups; both claims are acknowledged; it dies: the first LOGGED batch (row 5 and the
    # record of id 7) never reached the database, the second (row 8 with D7 in it, and the
    # record of id 8) was applied.
    first = Writer(db)
    d7, d8 = first.plan(D7, 1, 0), first.plan(D8, 1, 1)
    db.apply(first.claims(d7, timestamp=1) + first.claims(d8, timestamp=2))
    db.apply(first.batch(d8, timestamp=2))
    # Writer 2 re-reads from offset 0 (nothing was committed): id 7 is claimed by 1:0, its
    # own position, and the row includes 1:0, so it skips D7; D8 likewise.
    writer = Writer(db)
    writer.settle(D7, 1, 0, timestamp=3)
    writer.settle(D8, 1, 1, timestamp=4)
    assert _row(db) == (8, 0, 2)
    assert _owner(db, 8) == (f"{TOPIC}:1:1", f"{TOPIC}:1:1")
    assert _owner(db, 7) == (f"{TOPIC}:1:0", f"{TOPIC}:1:0"), "D7 settled, never recorded"


def test_claim_whose_batch_was_never_sent_owns_the_id() -> None:
    """A claim without its effect: writer 1 died after its claim was applied, before it was
    acknowledged, so the LOGGED batch was never sent. The copy in another partition is a
    duplicate of the claiming position, which settles it when it is read again."""
    db = SimDb()
    first = Writer(db)
    db.apply(first.claims(first.plan(D7, 1, 0), timestamp=1))
    writer = Writer(db)
    writer.settle(D7, 0, 0, timestamp=2)  # duplicate of 1:0: nothing written
    assert (10001, 1) not in db.balances()
    writer.settle(D7, 1, 0, timestamp=3)
    assert _row(db) == (5, 0, 1)
    assert _owner(db, 7) == (f"{TOPIC}:1:0", f"{TOPIC}:1:0")


def _two_crashed_writers(*, takeover_wait: bool) -> SimDb:
    """Writer 1 plans D7 (partition 0, offset 0) and D8 (offset 1) in two groups; both
    claims are acknowledged, so both LOGGED batches are sent. It dies: the first never
    reached the database, the second is in the batchlog (row 8, version 2, ts 2)."""
    db = SimDb()
    first = Writer(db)
    d7, d8 = first.plan(D7, 0, 0), first.plan(D8, 0, 1)
    db.apply(first.claims(d7, timestamp=1) + first.claims(d8, timestamp=2))
    first.batch(d7, timestamp=1)  # lost
    late_1 = first.batch(d8, timestamp=2)
    if takeover_wait:
        db.apply(late_1)  # writer 2 took over an expired lease: it waits for the batchlog
    # Writer 2 (timestamps above writer 1's) reads the row, plans D7 (5, version 1 if the
    # row lacks it) and dies too, its batch in the batchlog (ts 3).
    second = Writer(db)
    late_2 = second.batch(second.plan(D7, 0, 0), timestamp=3)
    if takeover_wait:
        # Writer 2 found D7 in the row: it only re-records it (its record was in the lost batch).
        assert late_2 and all(m.table != "user_balances" for m in late_2), "D7 applied twice"
        db.apply(late_2)
        return db
    assert late_1 and late_2
    # Without the wait: the batchlog applies writer 1's batch (row 8, both deposits) ...
    db.apply(late_1)
    # ... writer 3 re-reads from offset 0: the row has both deposits, nothing to write.
    # Offsets 0 and 1 are committed.
    third = Writer(db)
    third.settle(D7, 0, 0, timestamp=5)
    third.settle(D8, 0, 1, timestamp=6)
    assert _row(db) == (8, 0, 2)
    # ... then writer 2's batch: ts 3 > ts 2, the row goes back to D7 only.
    db.apply(late_2)
    return db


def test_late_batches_of_two_crashed_writers_lose_no_event_with_the_takeover_wait() -> None:
    assert _row(_two_crashed_writers(takeover_wait=True)) == (8, 0, 2)


TAKEOVER_WAIT = (
    "why the takeover wait exists (ARCHITECTURE.md 'Two crashed writers in a row'): "
    "without it, batches of two successive crashed writers landing late (batchlog): the "
    "second writer computed its row from a state without the first one's late batch and "
    "writes with a higher timestamp; a third writer reads the row after the first late "
    "batch and skips the events it contains, then the second late batch lands and "
    "overwrites them"
)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=TAKEOVER_WAIT)
def test_late_batches_of_two_crashed_writers_lose_no_event_without_the_takeover_wait(
) -> None:
    assert _row(_two_crashed_writers(takeover_wait=False)) == (8, 0, 2), "D8 (3) lost"


def test_late_claims_of_two_crashed_writers_after_the_takeover_wait_apply_once() -> None:
    db = SimDb()
    # Writer 1 plans D7 at 1:0 and dies with its claim in flight; it lands late, so its
    # LOGGED batch was never sent.
    first = Writer(db)
    late_1 = first.claims(first.plan(D7, 1, 0), timestamp=1)
    # Writer 2 sees no claim, reads the copy of D7 at 0:0 first and dies the same way.
    second = Writer(db)
    late_2 = second.claims(second.plan(D7, 0, 0), timestamp=2)
    assert late_1 and late_2
    db.apply(late_1)  # after writer 3's takeover wait
    # Writer 3: the copy at 0:0 is a duplicate of 1:0, which it settles (claim not
    # rewritten); offsets committed.
    third = Writer(db)
    third.settle(D7, 0, 0, timestamp=3)
    third.settle(D7, 1, 0, timestamp=4)
    assert _row(db) == (5, 0, 1)
    db.apply(late_2)  # later still: id 7 now claimed by 0:0
    # A replay from offset 0: 0:0 is its claim's own position, and the row lacks 0:0.
    replay = Writer(db)
    replay.settle(D7, 0, 0, timestamp=5)
    replay.settle(D7, 1, 0, timestamp=6)
    assert _row(db) == (5, 0, 1), "D7 (5) applied twice"
