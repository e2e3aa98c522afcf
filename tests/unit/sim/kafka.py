"""A simulated Kafka broker and consumer group for the crash simulation.

The broker holds the input partitions (written over time by the simulated engine), the
dead-letter topic as a `read_committed` reader sees it, and the group's committed
offsets. The group rebalances eagerly, as aiokafka's does: every member's
`on_partitions_revoked` runs (on the member's own process) before the new assignment,
members that do not rejoin within the rebalance timeout or stop heartbeating for the
session timeout are removed, and a removed member that comes back rejoins after revoking
what it had. The transactional producer commits dead letters and offsets atomically; a
newer producer with the same transactional id fences the older one.

Faults: the broker frozen (requests wait; a transaction commit may time out on the client
and still be applied), partitions added (a rebalance), members lost.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFenced,
)

from tests.unit.sim.world import Process, World

SESSION_TIMEOUT_S = 10.0
HEARTBEAT_S = 3.0
REBALANCE_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class SimRecord:
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class SimKafka:
    world: World
    rng: random.Random
    topic: str
    dlq_topic: str
    partitions: int
    logs: dict[TopicPartition, list[SimRecord]] = field(default_factory=dict)
    dead_letters: list[SimRecord] = field(default_factory=list)  # committed ones only
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    frozen: bool = False
    txn_epochs: dict[str, int] = field(default_factory=dict)
    group: SimGroup = field(init=False)
    _held: list[Callable[[], None]] = field(default_factory=list)
    commits: int = 0
    history: list[tuple[float, int, dict[int, int], list[Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for partition in range(self.partitions):
            self.logs[TopicPartition(self.topic, partition)] = []
        self.group = SimGroup(self)
        self.world.after(1.0, self.group.check_sessions)

    # -- the engine's side -----------------------------------------------------------------

    def produce(self, partition: int, record: SimRecord) -> None:
        self.logs[TopicPartition(self.topic, partition % len(self.logs))].append(record)

    def add_partition(self) -> None:
        self.logs[TopicPartition(self.topic, len(self.logs))] = []
        self.group.rebalance("partitions added")

    def ends(self) -> dict[TopicPartition, int]:
        return {tp: len(records) for tp, records in self.logs.items()}

    # -- requests --------------------------------------------------------------------------

    async def request(self, work: Callable[[], Any], *, timeout: float = REQUEST_TIMEOUT_S
                      ) -> Any:
        """Run `work` at the broker after the network; waits while the broker is frozen;
        the client gives up after `timeout` (the work may still happen later)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        process = _current(self.world)

        def serve() -> None:
            if not process.alive and self.rng.random() < 0.5:
                return  # the client died with it unsent
            if self.frozen:
                self._held.append(serve)
                return
            try:
                result, error = work(), None
            except Exception as exc:  # noqa: BLE001 - the broker answers with the error
                result, error = None, exc
            process.call_at(self.world.now + self._latency(), _settle, future, result, error)

        self.world.after(self._latency(), serve)
        shielded = asyncio.shield(future)
        # The broker's answer to a request nobody waits for any more (timed out, cancelled,
        # or its process ended) is not an error of the worker's: it is marked as looked at.
        # (CI run L: 'Future exception was never retrieved', InvalidTxnState of an abort
        # whose process had ended; not reproduced by its seed alone: it depends on when
        # the garbage collector finalizes the abandoned future.)
        for pending in (future, shielded):
            pending.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            return await asyncio.wait_for(shielded, timeout)
        except TimeoutError:
            raise KafkaTimeoutError("request timed out") from None

    def _latency(self) -> float:
        return self.rng.uniform(0.0002, 0.002)

    def freeze(self) -> None:
        self.frozen = True

    def thaw(self) -> None:
        self.frozen = False
        held, self._held = self._held, []
        for serve in held:
            self.world.after(self.rng.uniform(0, 0.01), serve)
        if self.rng.random() < 0.5:  # the broker's session clocks did not run meanwhile
            for member in self.group.members.values():
                member.last_heartbeat = self.world.now


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _current(world: World) -> Process:
    loop = asyncio.get_running_loop()
    for process in world.processes:
        if process.loop is loop:
            return process
    raise AssertionError("not running in a simulated process")


class SimGroup:
    """The group coordinator: members, generations, eager rebalances."""

    def __init__(self, kafka: SimKafka) -> None:
        self.kafka = kafka
        self.members: dict[str, SimConsumer] = {}
        self.generation = 0
        self.waiting: set[str] = set()
        self._ids = 0
        self.rebalances = 0

    def new_member_id(self) -> str:
        self._ids += 1
        return f"member-{self._ids}"

    def join(self, member: SimConsumer) -> None:
        self.members[member.member_id] = member
        member.last_heartbeat = self.kafka.world.now
        self.rebalance("member joined")

    def leave(self, member: SimConsumer) -> None:
        if self.members.pop(member.member_id, None) is not None:
            self.rebalance("member left")

    def rebalance(self, why: str) -> None:
        self.rebalances += 1
        self.generation += 1
        generation = self.generation
        self.waiting = set(self.members)
        for member in list(self.members.values()):
            member.prepare(generation)
        self.kafka.world.after(REBALANCE_TIMEOUT_S, lambda: self._timeout(generation))
        if not self.waiting:
            self._assign(generation)

    def _timeout(self, generation: int) -> None:
        if generation != self.generation or not self.waiting:
            return
        for member_id in list(self.waiting):  # did not rejoin in time: removed
            self.members.pop(member_id, None)
        self.rebalance("members did not rejoin")

    def rejoined(self, member: SimConsumer, generation: int) -> None:
        if generation != self.generation or member.member_id not in self.members:
            return
        self.waiting.discard(member.member_id)
        if not self.waiting:
            self._assign(generation)

    def _assign(self, generation: int) -> None:
        ids = sorted(self.members)
        partitions = sorted(self.kafka.logs, key=lambda tp: tp.partition)
        for index, member_id in enumerate(ids):
            mine = {tp for n, tp in enumerate(partitions) if n % len(ids) == index}
            self.members[member_id].assign(mine, generation)

    def heartbeat(self, member: SimConsumer) -> bool:
        """False: the member is no longer in the group (it must rejoin)."""
        if self.members.get(member.member_id) is not member:
            return False
        member.last_heartbeat = self.kafka.world.now
        return True

    def check_sessions(self) -> None:
        world = self.kafka.world
        if not self.kafka.frozen:
            lost = [member_id for member_id, member in self.members.items()
                    if world.now - member.last_heartbeat > SESSION_TIMEOUT_S]
            for member_id in lost:
                del self.members[member_id]
            if lost:
                self.rebalance("session timeout")
        world.after(1.0, self.check_sessions)


class SimConsumer:
    """What the worker's session uses of AIOKafkaConsumer, against `SimKafka`."""

    def __init__(self, kafka: SimKafka, process: Process) -> None:
        self.kafka = kafka
        self.process = process
        self.member_id = ""
        self.listener: ConsumerRebalanceListener | None = None
        self._assignment: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self.rebalancing = False
        self.last_heartbeat = 0.0
        self._heartbeat: asyncio.Task[None] | None = None
        self._highwater: dict[TopicPartition, int] = {}
        self._steps = asyncio.Lock()
        self.stopped = False
        # What a fetch response was served for: the assignment, the partition's last seek
        # and the position it read from (see `getmany`).
        self._assignments = 0
        self._seeks: dict[TopicPartition, int] = {}
        self._served: dict[TopicPartition, tuple[int, int, int]] = {}

    async def start(self) -> None:
        await self.kafka.request(lambda: None, timeout=5.0)

    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener) -> None:
        assert topics == [self.kafka.topic]
        self.listener = listener
        self.rebalancing = True
        self._join()
        self._heartbeat = asyncio.ensure_future(self._heartbeats())

    def _join(self) -> None:
        self.member_id = self.kafka.group.new_member_id()
        self.kafka.world.after(self.kafka._latency(), lambda: self.kafka.group.join(self))

    async def _heartbeats(self) -> None:
        while not self.stopped:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                known = await self.kafka.request(lambda: self.kafka.group.heartbeat(self))
            except KafkaTimeoutError:
                continue
            if not known and not self.rebalancing:
                # Removed from the group (session timeout): revoke what we had, rejoin.
                self.rebalancing = True
                async with self._steps:
                    await self._revoke()
                self._join()

    async def _revoke(self) -> None:
        revoked, self._assignment = set(self._assignment), set()
        self._assignments += 1
        if revoked and self.listener is not None:
            await self.listener.on_partitions_revoked(revoked)

    # -- called by the coordinator (world context): run on this member's process -----------

    def prepare(self, generation: int) -> None:
        self.rebalancing = True

        async def revoke_and_rejoin() -> None:
            # One coordinator task per member, as in aiokafka: a rebalance's steps never
            # overlap the previous one's (its revoke callback has returned first).
            async with self._steps:
                await self._revoke()
            self.kafka.world.after(self.kafka._latency(),
                                   lambda: self.kafka.group.rejoined(self, generation))

        self.process.call_at(self.kafka.world.now, _spawn, revoke_and_rejoin)

    def assign(self, partitions: set[TopicPartition], generation: int) -> None:
        async def assigned() -> None:
            async with self._steps:
                if generation != self.kafka.group.generation:
                    return
                # Positions come from the committed offsets when the assignment arrives.
                self.positions = {tp: self.kafka.committed.get(tp, 0) for tp in partitions}
                self._assignment = set(partitions)
                self._assignments += 1
                self.rebalancing = False
                if self.listener is not None:
                    await self.listener.on_partitions_assigned(set(partitions))

        self.process.call_at(self.kafka.world.now, _spawn, assigned)

    # -- the consumer API ------------------------------------------------------------------

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None
                      ) -> dict[TopicPartition, list[ConsumerRecord[Any, Any]]]:
        if self.rebalancing and not self.kafka.frozen:
            # As aiokafka: a getmany waits for the assignment (fetched_records ->
            # wait_for_assignment) and then hands out what the fetcher got from the new
            # positions, while the assignment callback may still be running.
            deadline = self.kafka.world.now + timeout_ms / 1000
            while self.rebalancing and self.kafka.world.now < deadline:  # noqa: ASYNC110 - the virtual clock
                await asyncio.sleep(0.01)
            if self.rebalancing:
                return {}
        if not self._assignment or self.kafka.frozen:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        fetched = await self.kafka.request(lambda: self._fetch(max_records or 500))
        # As aiokafka: records are handed out (and the position moves past them) only
        # while their assignment is still the active one and their partition's position
        # is still the offset they were fetched from (FetchResult.check_assignment;
        # seek_to drops what is buffered). A response that arrives after a rebalance
        # began or after a seek of its partition is dropped; one the client gave up on
        # (a timeout) never moved the position.
        served, self._served = self._served, {}
        fetched = {tp: records for tp, records in fetched.items()
                   if served.get(tp) == (*self._token(tp), self.positions.get(tp))}
        for tp, records in fetched.items():
            self.positions[tp] = records[-1].offset + 1
        if not fetched:
            await asyncio.sleep(timeout_ms / 1000)
        return dict(fetched)

    def _fetch(self, max_records: int) -> dict[TopicPartition, list[ConsumerRecord[Any, Any]]]:
        rng = self.kafka.rng
        out: dict[TopicPartition, list[ConsumerRecord[Any, Any]]] = {}
        if self.rebalancing:
            return out
        for tp in sorted(self._assignment, key=lambda tp: tp.partition):
            log = self.kafka.logs[tp]
            start = self.positions.get(tp, 0)
            count = min(len(log) - start, rng.randint(0, 12), max_records)
            if count <= 0:
                continue
            out[tp] = [_record(tp, offset, log[offset]) for offset in range(start, start + count)]
            self._served[tp] = (*self._token(tp), start)
            self._highwater[tp] = len(log)
        return out

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    async def committed(self, partition: TopicPartition) -> int | None:
        offset: int | None = await self.kafka.request(
            lambda: self.kafka.committed.get(partition))
        return offset

    def _token(self, tp: TopicPartition) -> tuple[int, int]:
        return self._assignments, self._seeks.get(tp, 0)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        assert partition in self._assignment, f"seek on {partition}, not assigned"
        self.positions[partition] = offset
        self._seeks[partition] = self._seeks.get(partition, 0) + 1

    async def beginning_offsets(self, partitions: list[TopicPartition]
                                ) -> dict[TopicPartition, int]:
        starts: dict[TopicPartition, int] = await self.kafka.request(
            lambda: {tp: 0 for tp in partitions})
        return starts

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        ends: dict[TopicPartition, int] = await self.kafka.request(
            lambda: {tp: len(self.kafka.logs[tp]) for tp in partitions})
        return ends

    def highwater(self, tp: TopicPartition) -> int | None:
        return self._highwater.get(tp)

    async def stop(self) -> None:
        self.stopped = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self.kafka.world.after(self.kafka._latency(), lambda: self.kafka.group.leave(self))


_RUNNING: set[asyncio.Task[Any]] = set()


def _spawn(factory: Callable[[], Any]) -> None:
    """Start a coordinator callback as a task of the member's process (kept referenced)."""
    task = asyncio.ensure_future(factory())
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)


def _record(tp: TopicPartition, offset: int, record: SimRecord) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(tp.topic, tp.partition, offset, record.timestamp_ms, 0, record.key,
                          record.value, None, len(record.key or b""),
                          len(record.value or b""), list(record.headers))


class SimProducer:
    """A transactional producer: dead letters and the group's offsets, atomically."""

    def __init__(self, kafka: SimKafka, transactional_id: str, group_id: str) -> None:
        self.kafka = kafka
        self.transactional_id = transactional_id
        self.group_id = group_id
        self.epoch = 0
        self._records: list[SimRecord] = []
        self._offsets: dict[TopicPartition, int] = {}
        self.in_transaction = False
        self._txn = 0
        self._committed_txn = -1

    def _check(self) -> None:
        if self.kafka.txn_epochs.get(self.transactional_id) != self.epoch:
            raise ProducerFenced()

    async def start(self) -> None:
        def init() -> int:
            epoch = self.kafka.txn_epochs.get(self.transactional_id, 0) + 1
            self.kafka.txn_epochs[self.transactional_id] = epoch
            return epoch

        try:
            self.epoch = await self.kafka.request(init, timeout=5.0)
        except KafkaTimeoutError:
            raise KafkaConnectionError("cannot reach the broker") from None

    async def stop(self) -> None:
        return None

    async def partitions_for(self, topic: str) -> set[int]:
        assert topic == self.kafka.dlq_topic
        return {0}

    async def begin_transaction(self) -> None:
        self._check()
        self._records, self._offsets, self.in_transaction = [], {}, True

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   partition: int | None = None, timestamp_ms: int | None = None,
                   headers: Any = None) -> asyncio.Future[None]:
        assert topic == self.kafka.dlq_topic and self.in_transaction
        self._records.append(SimRecord(key, value, 0, tuple(headers or ())))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def send_offsets_to_transaction(self, offsets: Mapping[TopicPartition, int],
                                          group_id: str) -> None:
        assert group_id == self.group_id and self.in_transaction
        self._offsets.update(offsets)
        await self.kafka.request(self._check)

    async def commit_transaction(self) -> None:
        records, offsets = list(self._records), dict(self._offsets)
        self._txn += 1
        txn = self._txn

        def commit() -> None:
            self._check()
            self.kafka.dead_letters.extend(records)
            for tp, offset in offsets.items():
                self.kafka.committed[tp] = offset
            self.kafka.commits += 1
            self.kafka.history.append(
                (round(self.kafka.world.now - 1_700_000_000, 3), self.epoch,
                 {tp.partition: offset for tp, offset in offsets.items()},
                 [dict(record.headers).get("settler.source") for record in records]))
            self._committed_txn = txn

        await self.kafka.request(commit)
        self.in_transaction = False

    async def abort_transaction(self) -> None:
        """Fails if the transaction being ended was committed after all (the commit's
        answer was lost): the coordinator refuses to abort it, as Kafka's does."""
        txn = self._txn
        self.in_transaction = False
        self._records, self._offsets = [], {}

        def abort() -> None:
            self._check()
            if self._committed_txn == txn:
                raise KafkaError("InvalidTxnState: the transaction was committed")

        await self.kafka.request(abort, timeout=5.0)
