"""A simulated Cassandra node for the crash simulation, and the worker's view of it.

`SimCassandra` is the node: cells in `SimDb`, a request path with latency, and faults:
frozen (SIGSTOP: requests wait), a process cut off by the network (its requests and
their replies are held until the link heals, then delivered late), a coordinator crash
(the unapplied partition shares of multi-partition LOGGED batches go to the batchlog and
are replayed seconds later; those of UNLOGGED batches are lost), the node killed
(SIGKILL, RF=1: everything written since the last periodic commitlog sync is lost,
acknowledged or not; LOGGED batches logged before that sync but not applied are
replayed 30-40 s after the node is back), lease LWTs timing out with an unknown outcome,
and the batch size limit.

`SimStore` is the REAL `SettlementDb` code (statement builders, result parsing) over this
node: only `run` is simulated, with the driver's client-side request timeout.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cassandra import InvalidRequest, OperationTimedOut, Unavailable, WriteTimeout, WriteType

import settler.store.db
from settler.store.batches import Batch
from settler.store.db import SettlementDb
from settler.store.lease import Holder
from tests.unit.sim.world import Process, World
from tests.unit.simdb import Mutation, SimDb, mutations

PROBE = "SELECT release_version FROM system.local"


def batch_bytes(batch: Batch) -> int:
    """The data size the node counts against its batch size limit."""
    size = 0
    for _, parameters in batch.statements:
        for value in parameters[:-1]:  # the last one is the write timestamp
            if isinstance(value, int):
                size += 8
            elif isinstance(value, str | bytes):
                size += len(value)
            elif isinstance(value, dict):
                size += 16 * len(value)
    return size


@dataclass
class Faults:
    """What may go wrong, with how likely, per request."""

    request_error: float = 0.0  # a timeout (outcome unknown) or unavailable node
    fail_threshold_bytes: int = 50 * 1024


@dataclass(eq=False)
class _Applying:
    """A multi-partition write being applied: the shares still to apply."""

    parts: list[list[Mutation]]
    logged: bool
    on_done: Callable[[], None] = lambda: None
    whole: list[Mutation] = field(default_factory=list)  # what a batchlog replay applies
    arrived: float = 0.0


@dataclass(eq=False)
class _Late:
    """A write that timed out after the node took it: it lands at `due` unless the node
    is killed first."""

    mutations: list[Mutation]
    logged: bool
    arrived: float
    due: float


COMMITLOG_SYNC_S = 10.0  # commitlog_sync_period: what a killed node may lose
BATCHLOG_AFTER_START_S = (30.0, 40.0)  # RING_DELAY, then the 10 s replay loop


@dataclass
class _Request:
    process: Process
    work: Callable[[], Any]
    reply: Callable[[Any, BaseException | None], None]


@dataclass
class SimCassandra:
    world: World
    rng: random.Random
    faults: Faults = field(default_factory=Faults)
    db: SimDb = field(default_factory=SimDb)
    lease: dict[str, Any] | None = None
    frozen: bool = False
    down: bool = False  # the coordinator crashed and is restarting
    slow: bool = False  # every request takes seconds (compaction, GC, a sick disk)
    write_errors: bool = False  # batches fail (timeouts, unavailable); reads and LWTs work
    lease_errors: bool = False  # LWTs time out (outcome unknown); other requests do not
    cut: set[str] = field(default_factory=set)  # processes cut off by the network
    _held: list[_Request] = field(default_factory=list)  # arrived while frozen
    _cut_held: dict[str, list[Callable[[], None]]] = field(
        default_factory=lambda: defaultdict(list))
    _applying: list[_Applying] = field(default_factory=list)
    _late: list[_Late] = field(default_factory=list)
    batchlog_replays: int = 0
    late_cells_lost: int = 0
    # The periodic commitlog sync: what survives a kill (cells and the lease row).
    synced_at: float | None = None
    _synced: tuple[SimDb, dict[str, Any] | None] | None = None
    kills: int = 0
    lost_on_kill: int = 0  # rows a kill took back (acknowledged writes among them)
    replay_until: float = 0.0  # the last batchlog replay scheduled by a kill
    _down_until: float = 0.0
    started_at: float = 0.0  # its gossip generation: when the node last started

    # -- the request path ------------------------------------------------------------------

    def latency(self) -> float:
        if self.slow:
            return self.rng.uniform(0.2, 4.0)
        roll = self.rng.random()
        if roll < 0.94:
            return self.rng.uniform(0.0002, 0.003)
        return self.rng.uniform(0.01, 0.3) if roll < 0.99 else self.rng.uniform(0.5, 2.0)

    def send(self, request: _Request) -> None:
        """A request leaves the client now; it reaches the node after the network."""
        name = request.process.name

        def arrive() -> None:
            if not request.process.alive and self.rng.random() < 0.5:
                return  # the client died with it unsent (its socket reset on close)
            if self.down:  # a dead or restarting process holds nothing
                self._answer(request, None, Unavailable("coordinator restarting"))
            elif self.frozen:
                self._held.append(request)
            else:
                self._serve(request)

        if name in self.cut:
            self._cut_held[name].append(arrive)
        else:
            self.world.after(self.latency(), arrive)

    def _serve(self, request: _Request) -> None:
        try:
            result, error = request.work(), None
        except Exception as exc:  # noqa: BLE001 - the node answers with the error
            result, error = None, exc
        if isinstance(result, _Applying):
            # A write is acknowledged once every share of it is applied; a coordinator
            # crash before that leaves the client without an answer (it times out).
            result.on_done = lambda: self._answer(request, None, None)
            return
        self._answer(request, result, error)

    def _answer(self, request: _Request, result: Any, error: BaseException | None) -> None:
        name = request.process.name

        def deliver() -> None:
            request.process.call_at(self.world.now, request.reply, result, error)

        if name in self.cut:
            self._cut_held[name].append(deliver)
        else:
            self.world.after(self.latency(), deliver)

    # -- faults ----------------------------------------------------------------------------

    def freeze(self) -> None:
        self.frozen = True

    def thaw(self) -> None:
        self.frozen = False
        held, self._held = self._held, []
        for request in held:
            self.world.after(self.rng.uniform(0, 0.01), lambda r=request: self._serve(r))

    def cut_off(self, process: str) -> None:
        self.cut.add(process)

    def heal(self, process: str) -> None:
        """The link comes back: everything held in the network arrives now, in order."""
        self.cut.discard(process)
        for delivery in self._cut_held.pop(process, []):
            self.world.after(self.rng.uniform(0, 0.005), delivery)

    def crash_coordinator(self, restart_after: float) -> None:
        """Batches being applied are cut: the rest of a LOGGED one comes back from the
        batchlog later (after 2 x write_request_timeout, checked every 10 s), the rest of
        an UNLOGGED one never."""
        for pending in self._applying:
            if pending.logged and pending.parts:
                rest = list(pending.parts)
                replay_at = self.rng.uniform(4.0, 14.0)
                self.world.after(replay_at, lambda rest=rest: self._replay(rest))
            pending.parts.clear()  # never acknowledged
        self._applying.clear()
        self._go_down(restart_after)

    def _go_down(self, seconds: float) -> None:
        """Down for `seconds` at least (a coordinator crash during a killed node's restart
        does not bring it back sooner)."""
        self.down = True
        self._down_until = max(self._down_until, self.world.now + seconds)
        self.world.after(seconds, self._restart)

    def _restart(self) -> None:
        if self.world.now >= self._down_until:
            self.down = False
            if self.kills:
                self.started_at = self.world.now

    def start_commitlog_sync(self) -> None:
        """Sync every COMMITLOG_SYNC_S from a random phase (only a kill needs it)."""
        def periodic() -> None:
            self.sync()
            self.world.after(COMMITLOG_SYNC_S, periodic)

        self.sync()
        self.world.after(self.rng.uniform(0.0, COMMITLOG_SYNC_S), periodic)

    def sync(self) -> None:
        """The commitlog synced now: what a kill keeps."""
        self.synced_at = self.world.now
        self._synced = (self.db.copy(), None if self.lease is None else dict(self.lease))

    def kill(self, restart_after: float) -> None:
        """SIGKILL, RF=1: the node comes back after `restart_after` with what its commitlog
        had synced. A LOGGED batch in flight whose batchlog entry was synced (it arrived
        before the sync) is replayed whole 30-40 s after the restart; any other write in
        flight is gone, and nothing in flight is ever acknowledged."""
        assert self._synced is not None, "start_commitlog_sync() first"
        synced_at = self.synced_at or 0.0
        self.kills += 1
        replays: list[list[Mutation]] = []
        for pending in self._applying:
            if pending.logged and pending.parts and pending.arrived < synced_at:
                replays.append(pending.whole)
            pending.parts.clear()  # never acknowledged
        self._applying.clear()
        for late in self._late:
            if late.logged and late.arrived < synced_at:
                replays.append(late.mutations)
        self._late.clear()
        self._held.clear()  # requests held by a frozen node die with it
        self.frozen = False
        # Connections to the killed process are reset: what the network still held for
        # it, or from it, never arrives.
        for held in self._cut_held.values():
            held.clear()
        db, lease = self._synced
        self.lost_on_kill += _rows_changed_since(db, self.db)
        self.db, self.lease = db.copy(), None if lease is None else dict(lease)
        self._go_down(restart_after)
        for whole in replays:
            when = restart_after + self.rng.uniform(*BATCHLOG_AFTER_START_S)
            self.replay_until = max(self.replay_until, self.world.now + when)
            self.world.after(when, lambda whole=whole: self._replay([whole]))

    def _replay(self, parts: list[list[Mutation]]) -> None:
        self.batchlog_replays += 1
        for part in parts:
            self.late_cells_lost += self.db.apply(part)

    # -- what the node does ----------------------------------------------------------------

    def write(self, batch: Batch) -> _Applying | None:
        """Apply a batch: each partition's share isolated, shares at slightly different
        moments (a multi-partition batch is atomic if LOGGED, never isolated)."""
        logged = batch.logged
        if logged and batch_bytes(batch) > self.faults.fail_threshold_bytes:
            raise InvalidRequest(f"Batch too large ({batch_bytes(batch)} bytes)")
        if self.write_errors and self.rng.random() < 0.95:
            # Writes fail for a while (replicas down for data, not for the lease's LWTs).
            if self.rng.random() < 0.8:
                raise Unavailable("not enough replicas for the write")
            self._apply_later(batch, logged)
            raise WriteTimeout("timed out waiting for replicas", write_type=WriteType.BATCH)
        if self.rng.random() < self.faults.request_error:
            if self.rng.random() < 0.5:
                raise Unavailable("not enough replicas")
            # A timeout after the coordinator took it: applied anyway, a bit later.
            self._apply_later(batch, logged)
            raise WriteTimeout("timed out waiting for replicas", write_type=WriteType.BATCH)
        parts: dict[Any, list[Mutation]] = defaultdict(list)
        for mutation in mutations(batch):
            parts[mutation.replica_key].append(mutation)
        shares = list(parts.values())
        self.rng.shuffle(shares)
        first, rest = shares[0], shares[1:]
        self.late_cells_lost += self.db.apply(first)
        if not rest:
            return None
        # The other shares land a moment later; a coordinator crash meanwhile cuts them.
        pending = _Applying(rest, logged, whole=[m for share in shares for m in share],
                            arrived=self.world.now)
        self._applying.append(pending)
        for share in list(rest):
            self.world.after(self.rng.uniform(0, 0.002),
                             lambda share=share, pending=pending: self._share(pending, share))
        return pending

    def _share(self, pending: _Applying, share: list[Mutation]) -> None:
        if share in pending.parts:
            pending.parts.remove(share)
            self.late_cells_lost += self.db.apply(share)
        if not pending.parts and pending in self._applying:
            self._applying.remove(pending)
            pending.on_done()

    def _apply_later(self, batch: Batch, logged: bool) -> None:
        """A write that timed out after the coordinator took it lands later anyway: a
        LOGGED batch by the batchlog replay (after 2 x write_request_timeout, scanned
        every 10 s: 4-14 s), an UNLOGGED one as replicas catch up (hints: 0-3 s)."""
        delay = self.rng.uniform(4.0, 14.0) if logged else self.rng.uniform(0.0, 3.0)
        late = _Late(mutations(batch), logged, self.world.now, self.world.now + delay)
        self._late.append(late)

        def land() -> None:
            if late in self._late:  # not taken by a kill meanwhile
                self._late.remove(late)
                self.late_cells_lost += self.db.apply(late.mutations)

        self.world.after(delay, land)

    def lwt(self, operation: Callable[[], Any]) -> Any:
        if self.lease_errors and self.rng.random() < 0.9:
            if self.rng.random() < 0.5:
                operation()  # applied, but the answer is lost
            raise WriteTimeout("LWT timed out (outcome unknown)", write_type=WriteType.CAS)
        return operation()


def _rows_changed_since(before: SimDb, now: SimDb) -> int:
    """Rows of `now` that `before` lacks or holds otherwise."""
    changed = 0
    for table, partitions in now.tables.items():
        for key, rows in partitions.items():
            old = before.tables[table].get(key, {})
            changed += sum(1 for row_key, row in rows.items() if old.get(row_key) != row)
    return changed


class SimLeaseTable:
    """The writer_lease row's lightweight transactions, linearizable at the node."""

    def __init__(self, store: SimStore) -> None:
        self.store = store
        self.node = store.node

    async def _lwt(self, operation: Callable[[], Any]) -> Any:
        return await self.store.request(lambda: self.node.lwt(operation))

    async def read(self) -> Holder | None:
        def read() -> Holder | None:
            row = self.node.lease
            return None if row is None else Holder(row["owner"], row["epoch"],
                                                   row["expires_at"], row["ts_ceiling"])
        result: Holder | None = await self.store.request(read)
        return result

    async def create(self, owner: str, expires_ms: int, ceiling: int) -> bool:
        def create() -> bool:
            if self.node.lease is not None:
                return False
            self.node.lease = {"owner": owner, "epoch": 1, "expires_at": expires_ms,
                               "ts_ceiling": ceiling}
            return True
        return bool(await self._lwt(create))

    def _if(self, condition: Callable[[dict[str, Any]], bool], **changes: Any
            ) -> Callable[[], bool]:
        def update() -> bool:
            row = self.node.lease
            if row is None or not condition(row):
                return False
            row.update(changes)
            return True
        return update

    async def take(self, owner: str, epoch: int, expires_ms: int, ceiling: int,
                   expected_epoch: int, expected_expires_ms: int) -> bool:
        return bool(await self._lwt(self._if(
            lambda row: (row["epoch"], row["expires_at"]) == (expected_epoch,
                                                               expected_expires_ms),
            owner=owner, epoch=epoch, expires_at=expires_ms, ts_ceiling=ceiling)))

    async def renew(self, owner: str, epoch: int, expires_ms: int, ceiling: int) -> bool:
        return bool(await self._lwt(self._if(
            lambda row: (row["owner"], row["epoch"]) == (owner, epoch),
            expires_at=expires_ms, ts_ceiling=ceiling)))

    async def rotate(self, owner: str, epoch: int, new_epoch: int, expires_ms: int,
                     ceiling: int) -> bool:
        return bool(await self._lwt(self._if(
            lambda row: (row["owner"], row["epoch"]) == (owner, epoch),
            epoch=new_epoch, expires_at=expires_ms, ts_ceiling=ceiling)))

    async def release(self, owner: str, epoch: int, ceiling: int) -> bool:
        return bool(await self._lwt(self._if(
            lambda row: (row["owner"], row["epoch"]) == (owner, epoch),
            owner=None, expires_at=0, ts_ceiling=ceiling)))


class SimStore(SettlementDb):
    """The real SettlementDb over the simulated node (statement names stand in for
    prepared statements; batches arrive as `settler.store.db.Batch`)."""

    def __init__(self, node: SimCassandra, process: Process, request_timeout_s: float) -> None:
        self.node = node
        self.process = process
        self.request_timeout_s = request_timeout_s
        self._prepared = {name: name for name in settler.store.db._CQL}  # type: ignore[misc]

    async def request(self, work: Callable[[], Any]) -> Any:
        """Send `work` to the node; its answer, or the driver's OperationTimedOut."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def reply(result: Any, error: BaseException | None) -> None:
            if future.done():
                return  # the client gave up already: a late answer is dropped
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def give_up() -> None:
            if not future.done():
                future.set_exception(OperationTimedOut("client request timeout"))

        self.node.send(_Request(self.process, work, reply))
        timer = loop.call_later(self.request_timeout_s, give_up)
        try:
            return await future
        finally:
            timer.cancel()

    async def run(self, statement: Any, parameters: Any = None) -> Any:
        node = self.node
        if isinstance(statement, Batch):
            return await self.request(lambda: node.write(statement))
        if statement == PROBE:
            return await self.request(lambda: [("5.0.6",)])
        return await self.request(lambda: node.db.select(statement, parameters or ()))

    async def read(self, name: str, parameters: tuple[Any, ...]) -> Any:
        return await self.run(name, parameters)

    def lease_table(self) -> SimLeaseTable:
        return SimLeaseTable(self)

    async def server(self) -> str:
        return "cassandra"

    async def batch_fail_threshold(self) -> int | None:
        return self.node.faults.fail_threshold_bytes

    async def node_uptimes(self) -> list[float]:
        """By the node's clock (the simulation's true time), like Cassandra's: its time
        minus its gossip generation (whole seconds)."""
        uptimes: list[float] = await self.request(
            lambda: [self.node.world.now - int(self.node.started_at)])
        return uptimes

    async def probe(self) -> None:
        await self.run(PROBE)

    async def close(self) -> None:
        return None
