"""Scripted histories for the crash simulation: the same deployment as `Simulation` (the
REAL worker against simulated Kafka and Cassandra), but with faults placed by hooks on
what the workers do (a batch sent, a transaction begun) rather than drawn at random, so
that one precise history replays on every seed.

Hooks see each statement a worker sends to the database (`on_send`), each lease renewal
(`on_renew`) and each transaction a worker hands offsets to (`on_offsets`); a hook may act
on the world (freeze Kafka, stop or kill a worker) or take over what the node does with
the request and when its answer arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from unittest import mock

from aiokafka.errors import MessageSizeTooLargeError
from cassandra import WriteTimeout, WriteType

import tests.unit.sim.run as sim_run
from settler.store.batches import Batch
from tests.unit.sim.cassandra import SimLeaseTable, SimStore
from tests.unit.sim.kafka import SimKafka, SimProducer
from tests.unit.sim.run import Simulation
from tests.unit.simdb import mutations

# What a hook returns for a statement: None lets it go to the node as usual; else a
# coroutine awaited instead (see `ScriptedSimulation.at_node` and `answered_at`).
Takeover = Coroutine[Any, Any, Any] | None
# What a hook returns for a lease renewal: None lets it go to the node as usual; else
# (applied, answer_after_s): the renewal is applied at once (or not: the node answers a
# timeout, outcome unknown), and the answer reaches the worker after answer_after_s.
Renewal = tuple[bool, float] | None


def logged(statement: Any) -> bool:
    return isinstance(statement, Batch) and statement.logged


def record_ids(batch: Batch) -> set[tuple[str, int]]:
    """The (statement, id) of each event record a settlement batch carries."""
    return {(name, parameters[1]) for name, parameters in batch.statements
            if name in ("write_trade", "write_balance_event")}


def row_keys_of(batch: Batch) -> set[tuple[int, int]]:
    return {(parameters[0], parameters[1]) for name, parameters in batch.statements
            if name == "write_balance"}


@dataclass
class ScriptedSimulation(Simulation):
    on_send: list[Callable[[ScriptedSimulation, SimStore, Any], Takeover]] = field(
        default_factory=list)
    on_offsets: list[Callable[[ScriptedSimulation, SimProducer], None]] = field(
        default_factory=list)
    on_renew: list[Callable[[ScriptedSimulation, str], Renewal]] = field(
        default_factory=list)
    script: list[tuple[float, Callable[[ScriptedSimulation], None]]] = field(
        default_factory=list)
    # aiokafka's transactional calls never time out by themselves: the sender retries until
    # the coordinator answers (send_offsets_to_transaction, commit_transaction and
    # abort_transaction await shielded futures). SimProducer's give up after 15 s (5 s for
    # an abort); True makes them wait as aiokafka's do.
    patient_transactions: bool = False
    # The dead-letter topic's max.message.bytes: a record above it is refused by the broker
    # (MESSAGE_TOO_LARGE, not retriable). aiokafka fails that record's send future and
    # still commits the transaction (flush_for_commit waits for the batch, ignores its
    # error). SimProducer accepts every record; a limit here refuses as the broker would.
    dlq_max_message_bytes: int | None = None

    def schedule_faults(self) -> None:
        super().schedule_faults()
        for when, action in self.script:
            self.world.at(self.world.now + when, partial(action, self))

    def note(self, what: str) -> None:
        self.events.append(f"{self.world.now:.3f} {what}")

    def worker_named(self, process: str) -> str:
        return process.split("#", 1)[0]

    def later(self, delay: float, what: str, action: Callable[[], None]) -> None:
        """`action` in `delay` seconds, noted in the history as `what`."""
        def act() -> None:
            self.note(what)
            action()

        self.world.after(delay, act)

    async def batchlog(self, store: SimStore, batch: Batch, after_s: float) -> Any:
        """A LOGGED batch whose coordinator wrote the batchlog and then timed out waiting
        for replicas: the client gets WriteTimeout(BATCH), the batch is applied later by
        the batchlog replay (Cassandra replays entries older than 2 x
        write_request_timeout, scanning every 10 s: 4 to 14 s with the defaults)."""
        node = self.node

        def work() -> Any:
            late = mutations(batch)

            def replay() -> None:
                node.db.apply(late)

            self.later(after_s, "batchlog replayed", replay)
            raise WriteTimeout("timed out waiting for replicas", write_type=WriteType.BATCH)

        return await store.request(work)

    async def answered_at(self, batch: Batch, when: float) -> Any:
        """The batch is applied at once; its acknowledgement reaches the worker at `when`
        (a slow answer, as from a node in trouble)."""
        self.node.db.apply(mutations(batch))
        await asyncio.sleep(max(0.0, when - self.world.now))

    def run(self) -> None:
        with mock.patch.object(sim_run, "SimStore", _hooked_store(self)), \
                mock.patch.object(sim_run, "SimProducer", _hooked_producer(self)):
            super().run()


def _hooked_store(simulation: ScriptedSimulation) -> type[SimStore]:
    class HookedLeaseTable(SimLeaseTable):
        async def renew(self, owner: str, epoch: int, expires_ms: int, ceiling: int) -> bool:
            for hook in simulation.on_renew:
                verdict = hook(simulation, self.store.process.name)
                if verdict is None:
                    continue
                applied, answer_after_s = verdict
                update = self._if(lambda row: (row["owner"], row["epoch"]) == (owner, epoch),
                                  expires_at=expires_ms, ts_ceiling=ceiling)
                done = update() if applied else False
                await asyncio.sleep(answer_after_s)
                if not applied:
                    raise WriteTimeout("LWT timed out (outcome unknown)",
                                       write_type=WriteType.CAS)
                return done
            return await super().renew(owner, epoch, expires_ms, ceiling)

    class HookedStore(SimStore):
        def lease_table(self) -> SimLeaseTable:
            return HookedLeaseTable(self)

        async def run(self, statement: Any, parameters: Any = None) -> Any:
            for hook in simulation.on_send:
                instead = hook(simulation, self, statement)
                if instead is not None:
                    return await instead
            return await super().run(statement, parameters)

    return HookedStore


def _hooked_producer(simulation: ScriptedSimulation) -> type[SimProducer]:
    class HookedProducer(SimProducer):
        def __init__(self, kafka: SimKafka, transactional_id: str, group_id: str) -> None:
            super().__init__(kafka, transactional_id, group_id)
            if simulation.patient_transactions:
                self.kafka = _Patient(kafka)  # type: ignore[assignment]

        async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                       partition: int | None = None, timestamp_ms: int | None = None,
                       headers: Any = None) -> asyncio.Future[None]:
            limit = simulation.dlq_max_message_bytes
            if limit is not None and record_bytes(key, value, headers) > limit:
                refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                refused.set_exception(MessageSizeTooLargeError(
                    f"the broker refused a {record_bytes(key, value, headers)} byte record"))
                simulation.note(f"the broker refuses a dead letter of "
                                f"{record_bytes(key, value, headers)} bytes")
                return refused
            return await super().send(topic, value, key, partition, timestamp_ms, headers)

        async def send_offsets_to_transaction(self, offsets: Any, group_id: str) -> None:
            for hook in simulation.on_offsets:
                hook(simulation, self)
            await super().send_offsets_to_transaction(offsets, group_id)

    return HookedProducer


def record_bytes(key: bytes | None, value: bytes | None, headers: Any) -> int:
    """A record's size as the broker counts it against max.message.bytes (a record batch
    of one: about 70 bytes of batch and record framing)."""
    return 70 + len(key or b"") + len(value or b"") + sum(
        len(name) + len(data) for name, data in headers or ())


class _Patient:
    """A SimKafka whose requests wait for their answer however long it takes."""

    def __init__(self, kafka: SimKafka) -> None:
        object.__setattr__(self, "_kafka", kafka)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kafka, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._kafka, name, value)

    async def request(self, work: Callable[[], Any], *, timeout: float | None = None) -> Any:
        return await self._kafka.request(work, timeout=PATIENCE_S)


PATIENCE_S = 24 * 3600.0


def stop(simulation: Simulation, name: str) -> None:
    """SIGTERM the worker `name` now."""
    run = simulation.workers[name]
    run.process.call_at(simulation.world.now, run.worker.stopping.set)


def restart_when_exited(simulation: Simulation, name: str, delay: float) -> None:
    run = simulation.workers[name]

    def check() -> None:
        if run.task.done() or not run.process.alive:
            simulation.world.after(delay, lambda: simulation.start_worker(name))
        else:
            simulation.world.after(0.5, check)

    simulation.world.after(0.5, check)
