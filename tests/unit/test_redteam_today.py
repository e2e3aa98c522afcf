"""Red team, today's two fixes: histories tried against them that they survive, kept as
regression tests (nothing below is an xfail: no attack found a wrong balance, a lost
cancel, a renewed lease or a hung shutdown; see the notes at the end of the module).

Fix 1 (`on_partitions_assigned` plans nothing while it runs and ends by seeking every
partition to its start in one step). The tests drive the REAL listener
(settler.worker.rebalance.Rebalance) and the REAL session loop (`WriterSession._loop`)
against a consumer built on aiokafka's own `SubscriptionState` and `FetchResult`: the
assignment is installed before the callback runs, the fetcher buffers records from the
group's committed offset while the callback awaits its OffsetFetches, and `getmany` hands
out whatever `FetchResult.check_assignment` lets through. A seek here does NOT drop what
is buffered (aiokafka's `Fetcher.seek_to` does): only check_assignment (the partition's
position is no longer where the records were fetched from) keeps a stale fetch out, so
the model hands out at least as much as aiokafka would.

Fix 2 (`settler.timeouts.within` instead of `asyncio.wait_for`): its semantics where they
differ from CPython 3.11's wait_for, and a guard that no call site hands `within` an
awaitable that someone else also waits on (a timeout would cancel it for them too).
"""

from __future__ import annotations

import ast
import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.consumer.fetcher import FetchResult
from aiokafka.consumer.subscription_state import SubscriptionState

from settler import metrics
from settler.core.offsets import Offsets
from settler.timeouts import within
from settler.worker.rebalance import Rebalance
from settler.worker.retry import Backoff, Retrier
from settler.worker.session import WriterSession

TOPIC = "t"
P0, P1, P2 = (TopicPartition(TOPIC, n) for n in range(3))
FETCH_SIZE = 4


class _Records:
    """aiokafka's PartitionRecords as FetchResult uses it: offsets from `start`."""

    def __init__(self, start: int, end: int) -> None:
        self.next_fetch_offset = start
        self._end = end

    def __iter__(self) -> _Records:
        return self

    def __next__(self) -> int:
        if self.next_fetch_offset >= self._end:
            raise StopIteration
        offset = self.next_fetch_offset
        self.next_fetch_offset += 1
        return offset


class AiokafkaLikeConsumer:
    """What the session uses of AIOKafkaConsumer, on aiokafka's own subscription state and
    fetch results. `group` is the group's committed offsets; `log` each partition's
    (start, end); OffsetFetch and ListOffsets take `rtt` loop iterations each."""

    def __init__(self, group: dict[TopicPartition, int], log: dict[TopicPartition,
                 tuple[int, int]], rtt: int = 3) -> None:
        self.group = group
        self.log = log
        self.rtt = rtt
        self.subscription = SubscriptionState()
        self.subscription.subscribe({TOPIC})
        self.buffered: dict[TopicPartition, FetchResult] = {}
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.iteration_of_seeks: list[int] = []
        self.iteration = 0
        self.stale_at_seek = 0  # fetches buffered elsewhere than the seek's offset
        self.installed_at = 0

    # -- aiokafka's side (coordinator, commit refresh task, fetcher) ---------------------

    def install(self, partitions: set[TopicPartition]) -> None:
        """GroupCoordinator._on_join_complete: the assignment before the callback."""
        self.subscription.assign_from_subscribed(set(partitions))
        self.installed_at = self.iteration

    def fetcher_step(self) -> None:
        """Positions from the group's commit (the refresh task's OffsetFetch, answered a
        round trip after the assignment; the reset policy when there is none), then a
        fetch buffered at each position."""
        self.iteration += 1
        assignment = self.subscription.subscription.assignment
        if assignment is None or self.iteration < self.installed_at + max(1, self.rtt):
            return
        for tp in sorted(assignment.tps):
            state = assignment.state_value(tp)
            if not state.has_valid_position:
                state.reset_to(self.group.get(tp, self.log[tp][0]))
            if tp not in self.buffered and state.position < self.log[tp][1]:
                self.buffered[tp] = FetchResult(
                    tp, assignment=assignment, backoff=0,
                    partition_records=_Records(state.position,
                                               min(state.position + FETCH_SIZE,
                                                   self.log[tp][1])))

    # -- the consumer API ----------------------------------------------------------------

    async def getmany(self, wait: int = 10) -> dict[TopicPartition, list[int]]:
        """Fetcher.fetched_records: what is buffered, else wait (`wait` iterations, the
        worker's 200 ms) for the fetcher to buffer something."""
        for _ in range(wait):
            await asyncio.sleep(0)
            out: dict[TopicPartition, list[int]] = {}
            for tp, result in list(self.buffered.items()):
                records = result.getall()  # check_assignment: active, position unchanged
                if not result.has_more():
                    del self.buffered[tp]
                if records:
                    out[tp] = records
            if out:
                return out
        return {}

    async def committed(self, tp: TopicPartition) -> int | None:
        for _ in range(self.rtt):
            await asyncio.sleep(0)
        return self.group.get(tp)

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        for _ in range(self.rtt):
            await asyncio.sleep(0)
        return {tp: self.log[tp][0] for tp in tps}

    async def seek_to_beginning(self, *tps: TopicPartition) -> bool:
        """(The listener before the fix used it.)"""
        for tp in tps:
            self.seek(tp, self.log[tp][0])
        return True

    def seek(self, tp: TopicPartition, offset: int) -> None:
        result = self.buffered.get(tp)
        if result is not None and result.has_more() and (
                result._partition_records.next_fetch_offset != offset):
            self.stale_at_seek += 1
        self.subscription.seek(tp, offset)  # what is buffered stays (see module doc)
        self.seeks.append((tp, offset))
        self.iteration_of_seeks.append(self.iteration)


class FakeSession:
    """The parts of WriterSession the real Rebalance listener and the real `_loop` use;
    planning records (tp, offset) in the order it is handed them."""

    def __init__(self, consumer: AiokafkaLikeConsumer, recorded: dict[str, int]) -> None:
        self.ended = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.health = metrics.Health()
        self.offsets: Offsets[TopicPartition] = Offsets()
        self.seeded: dict[str, int] = {}
        self.committer = SimpleNamespace(progress=SimpleNamespace(
            committed_high=dict(recorded), seed_committed=self.seeded.update))
        self.kafka = SimpleNamespace(consumer=consumer, report_lag=self._forever)
        self.dead_letters = SimpleNamespace(published_below={})
        self.retrier = Retrier(Backoff(0.001, 0.002), ending=self.ended.is_set,
                               wake=self.ended, health=self.health)
        self.rebalance = Rebalance(self)  # type: ignore[arg-type]
        self.planned: list[tuple[TopicPartition, int]] = []
        self.dropped_while_busy = 0
        self.pipeline = SimpleNamespace(fatal=None, settle=self._settle)
        self.intake = SimpleNamespace(fetch=self._fetch, items=self._items, load=self._load)
        self._commit_loop = self._forever

    async def _forever(self, *_: Any) -> None:
        await asyncio.Event().wait()

    async def _fetch(self) -> dict[TopicPartition, list[int]]:
        fetched = await self.kafka.consumer.getmany()
        if fetched and getattr(self.rebalance, "busy", False):
            self.dropped_while_busy += sum(len(records) for records in fetched.values())
        return fetched

    def _items(self, fetched: dict[TopicPartition, list[int]]) -> list[tuple[TopicPartition,
                                                                             int]]:
        items = []
        for tp, offsets in fetched.items():
            for offset in offsets:
                self.offsets.track(tp, offset)  # raises on an offset out of order
                items.append((tp, offset))
        return items

    async def _load(self, items: list[Any]) -> None:
        await asyncio.sleep(0)

    async def _settle(self, items: list[tuple[TopicPartition, int]], pause: Any) -> None:
        for item in items:
            if pause():
                break
            self.planned.append(item)

    def _pause(self) -> bool:
        return getattr(self.rebalance, "busy", self.rebalance.revoking) or self.ended.is_set()

    def _end(self, end: Any) -> None:
        self.ended.set()

    def fail(self, exc: BaseException) -> None:
        self.pipeline.fatal = self.pipeline.fatal or exc
        self._end("fatal")


async def _assignment_history(group: dict[TopicPartition, int], recorded: dict[str, int],
                              log: dict[TopicPartition, tuple[int, int]], *,
                              end_during_callback: bool = False, rtt: int = 3
                              ) -> tuple[FakeSession, AiokafkaLikeConsumer]:
    return await _run_with(AiokafkaLikeConsumer(group, log, rtt=rtt), recorded,
                           end_during_callback=end_during_callback)


def _planned_by_partition(session: FakeSession) -> dict[TopicPartition, list[int]]:
    out: dict[TopicPartition, list[int]] = {}
    for tp, offset in session.planned:
        out.setdefault(tp, []).append(offset)
    return out


def test_records_fetched_from_the_group_commit_during_the_callback_are_never_planned() -> None:
    """P1's database record (20) is below the group's commit (30): the fetcher buffers
    P1 from 30 (and P0, P2 from their commits) while the callback awaits three
    OffsetFetches and a ListOffsets. The loop is handed those records and drops them;
    after the seeks every partition is planned from its start, in order, with no gap and
    no offset twice; a buffered fetch the seek did not discard (P1 at 30) is refused by
    aiokafka's check_assignment."""
    group = {P0: 10, P1: 30}  # P2 never committed: its earliest offset after retention
    recorded = {f"{TOPIC}:0": 10, f"{TOPIC}:1": 20, f"{TOPIC}:2": 99}
    log = {P0: (0, 40), P1: (0, 40), P2: (7, 40)}
    session, consumer = asyncio.run(_assignment_history(group, recorded, log))
    planned = _planned_by_partition(session)
    starts = {P0: 10, P1: 20, P2: 7}
    for tp, start in starts.items():
        assert planned[tp] == list(range(start, start + len(planned[tp]))), planned[tp]
        assert len(planned[tp]) >= FETCH_SIZE
    assert session.dropped_while_busy > 0, "no record was fetched during the callback"
    assert consumer.stale_at_seek > 0, "no stale fetch was buffered at the seeks"
    # Every partition was sought once, all in the same loop iteration (one step).
    assert sorted(consumer.seeks) == sorted(starts.items())
    assert len(set(consumer.iteration_of_seeks)) == 1
    # Only partitions both the group and the database know are seeded as committed.
    assert session.seeded == {f"{TOPIC}:0": 10, f"{TOPIC}:1": 20}
    assert session.dead_letters.published_below == {P0: 10, P1: 30}
    assert session.offsets.last_committed() == {P0: 10, P1: 30}


@pytest.mark.parametrize("rtt", [0, 1, 5])
def test_busy_holds_from_the_callback_start_to_its_seeks(rtt: int) -> None:
    """However fast the coordinator answers (rtt 0: no await at all inside the calls),
    `busy` is already true when the callback first yields and the seeks come before it
    is cleared."""
    group = {P0: 5, P1: 9}
    recorded = {f"{TOPIC}:0": 3, f"{TOPIC}:1": 9}
    log = {P0: (0, 30), P1: (0, 30)}
    session, _ = asyncio.run(_assignment_history(group, recorded, log, rtt=rtt))
    planned = _planned_by_partition(session)
    assert planned[P0][0] == 3 and planned[P1][0] == 9
    for offsets in planned.values():
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    assert not session.rebalance.busy and session.rebalance.steady.is_set()


def test_a_session_ending_during_the_callback_plans_nothing_of_the_new_assignment() -> None:
    """Stopping while the callback awaits: it returns without seeking (the loop stays
    paused), and nothing fetched from the group's commit is planned."""
    group = {P0: 10, P1: 30}
    recorded = {f"{TOPIC}:0": 10, f"{TOPIC}:1": 20}
    log = {P0: (0, 40), P1: (0, 40)}
    session, consumer = asyncio.run(_assignment_history(
        group, recorded, log, end_during_callback=True))
    assert session.planned == []
    assert consumer.seeks == [] and session.rebalance.busy


def test_an_error_deciding_a_start_ends_the_session_instead_of_pausing_it() -> None:
    """A non-transient error from the group's OffsetFetch inside the callback (aiokafka
    logs a callback's exception and goes on): the session ends FATAL (exit 1) rather
    than staying paused for ever while holding the lease; nothing is planned or sought.
    (Before: `assigning` stayed set and the worker settled nothing, silently.)"""
    refused = PermissionError("GROUP_AUTHORIZATION_FAILED")

    async def history() -> tuple[FakeSession, AiokafkaLikeConsumer]:
        consumer = AiokafkaLikeConsumer({P0: 10, P1: 30}, {P0: (0, 40), P1: (0, 40)})

        async def committed(tp: TopicPartition) -> int | None:
            raise refused

        consumer.committed = committed  # type: ignore[method-assign]
        session = FakeSession(consumer, {f"{TOPIC}:0": 10, f"{TOPIC}:1": 20})
        consumer.install(set(consumer.log))
        await asyncio.wait_for(session.rebalance.on_partitions_assigned(set(consumer.log)),
                               1.0)
        return session, consumer

    session, consumer = asyncio.run(history())
    assert session.ended.is_set() and session.pipeline.fatal is refused
    assert session.planned == [] and consumer.seeks == []


def test_control_without_the_seek_back_the_group_commit_is_planned_first() -> None:
    """The model shows what the fix's seeks are for: the same consumer with the
    listener's seeks suppressed plans P1 from the group's commit (30) or later, above
    the database's record (20): the re-read window is skipped; and what the loop dropped
    while the callback ran is never planned (each partition starts past its commit)."""
    async def history() -> FakeSession:
        consumer = AiokafkaLikeConsumer({P0: 10, P1: 30}, {P0: (0, 40), P1: (0, 40)})
        consumer.seek = lambda tp, offset: None  # type: ignore[method-assign]
        session, _ = await _run_with(consumer, {f"{TOPIC}:0": 10, f"{TOPIC}:1": 20})
        return session

    session = asyncio.run(history())
    planned = _planned_by_partition(session)
    assert planned[P1][0] >= 30 > 20
    assert session.dropped_while_busy == 0 or planned[P0][0] > 10


async def _run_with(consumer: AiokafkaLikeConsumer, recorded: dict[str, int], *,
                    end_during_callback: bool = False
                    ) -> tuple[FakeSession, AiokafkaLikeConsumer]:
    """The real `_loop` and listener against `consumer`: the assignment is installed, then
    the callback runs (as aiokafka does) while the fetcher keeps fetching."""
    session = FakeSession(consumer, recorded)
    loop_task = asyncio.ensure_future(WriterSession._loop(session))  # type: ignore[arg-type]

    async def fetcher() -> None:
        while True:
            consumer.fetcher_step()
            await asyncio.sleep(0)

    fetching = asyncio.ensure_future(fetcher())
    await asyncio.sleep(0)
    partitions = set(consumer.log)
    consumer.install(partitions)  # aiokafka: assignment first, then the callback
    callback = asyncio.ensure_future(session.rebalance.on_partitions_assigned(partitions))
    if end_during_callback:  # while the first OffsetFetch is awaited
        for _ in range(2):
            await asyncio.sleep(0)
        session.ended.set()
    await callback
    for _ in range(200):
        await asyncio.sleep(0)
    session.ended.set()
    await asyncio.wait_for(loop_task, 1.0)
    fetching.cancel()
    return session, consumer


# -- Fix 2: settler.timeouts.within ---------------------------------------------------------


def test_within_delivers_a_cancel_that_arrives_as_the_awaited_call_finishes() -> None:
    """gh-86296: the inner future completes and the waiting task is cancelled in the same
    loop iteration. `within` raises CancelledError (the lease keeper ends); CPython
    3.11's wait_for returned the result (the keeper renewed on)."""
    async def scenario(bounded: Any) -> str:
        loop = asyncio.get_running_loop()
        inner: asyncio.Future[str] = loop.create_future()

        async def waiter() -> str:
            return await bounded(inner)

        task = asyncio.ensure_future(waiter())
        await asyncio.sleep(0)  # the task waits on inner
        inner.set_result("renewed")
        task.cancel()  # same iteration
        try:
            return await task
        except asyncio.CancelledError:
            return "cancelled"

    assert asyncio.run(scenario(lambda fut: within(5.0, fut))) == "cancelled"
    if sys.version_info < (3, 12):
        # The reason for the fix, on the interpreter the project ships.
        assert asyncio.run(scenario(lambda fut: asyncio.wait_for(fut, 5.0))) == "renewed"


def test_within_a_timeout_and_a_cancel_in_one_iteration_is_a_cancel() -> None:
    """A timeout that expires in the iteration an outside cancel arrives (a renewal timing
    out as `Tenure.end` cancels the keeper; a land task's retry sleep as the session
    abandons it): the cancel wins, so the cancelled loop cannot `continue`."""
    async def scenario() -> str:
        loop = asyncio.get_running_loop()
        never: asyncio.Future[None] = loop.create_future()
        task = asyncio.current_task()
        assert task is not None

        async def inner() -> None:
            loop.call_soon(task.cancel)  # after the timeout's own call_soon
            await never

        try:
            await within(0.0, inner())
        except TimeoutError:
            return "timeout"
        except asyncio.CancelledError:
            return "cancelled"
        return "returned"

    assert asyncio.run(scenario()) == "cancelled"


def test_within_zero_still_runs_the_wait() -> None:
    """The revoke callback waits for the loop to be idle with the time left of its drain
    deadline, possibly 0: with the loop already idle the wait succeeds (wait_for on 3.11
    raised TimeoutError without running it, and the revoke abandoned the session)."""
    async def scenario() -> bool:
        idle = asyncio.Event()
        idle.set()
        return await within(0.0, idle.wait())

    assert asyncio.run(scenario()) is True

    async def not_idle() -> None:
        await within(0.0, asyncio.Event().wait())

    with pytest.raises(TimeoutError):
        asyncio.run(not_idle())


# Call sites whose awaitable is a parameter: every caller passes a fresh coroutine.
_PARAMETER_SITES = {("settler/ops/status.py", "_bounded")}


def _within_calls() -> list[tuple[str, str, ast.expr]]:
    root = Path(__file__).resolve().parents[2]
    found = []
    for path in sorted((root / "settler").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id == "within"):
                    found.append((str(path.relative_to(root)), function.name, node.args[1]))
    return found


def test_every_within_call_site_awaits_something_of_its_own() -> None:
    """A timeout in `within` cancels what it awaits: a Task or Future that another waiter
    shares would be cancelled for it too. Every call site hands `within` a call made
    there (a coroutine, or a future nobody else holds: gather, to_thread)."""
    calls = _within_calls()
    assert len(calls) >= 25, "the call sites moved: update this test"
    shared = [(path, function, ast.unparse(argument)) for path, function, argument in calls
              if not isinstance(argument, ast.Call)
              and (path, function) not in _PARAMETER_SITES]
    assert shared == []


# Notes: what was tried and held (no reproduction of a wrong balance or a hang).
# - aiokafka 0.14 runs both callbacks in its one coordination task, so no revoke or second
#   rebalance can start while `on_partitions_assigned` awaits; a getmany blocked across the
#   rebalance waits in `wait_for_assignment`, and a new assignment has no position until an
#   OffsetFetch answers, so `assigning` is set before any record of it can be handed out.
# - After the seeks, a buffered or in-flight fetch from another offset is refused
#   (FetchResult.check_assignment; `_proc_fetch_request` checks the position; seek_to drops
#   the buffer); `_update_fetch_positions` and the reset path skip a partition once sought.
# - Never committed: the seek to `beginning_offsets` behaves as the "earliest" reset policy;
#   offsets deleted by retention in between give OffsetOutOfRange, reset to earliest again.
# - `seed_committed` seeds the same set of partitions as before the fix.
# - `within` call sites: none awaits a shared Task/Future or `asyncio.shield`; aiokafka 0.14's
#   own timeouts (util.wait_for, async_timeout 5 on 3.11) are asyncio.Timeout, so a cancel of
#   report_lag or the commit loop inside end_offsets/abort_transaction is delivered; a result
#   discarded by a simultaneous timeout (renew, progress write, abort) is retried or ends the
#   session, never settles anything.


@pytest.mark.parametrize("inner", ["converts", "swallows"])
def test_within_raises_a_cancel_the_awaited_code_converted_or_swallowed(inner: str) -> None:
    """Some library code turns the cancellation delivered into it into its own error (a
    Kafka client's connection error) or returns normally. `within` must still end its
    task cancelled, as wait_for did: `settler status --watch` kept redrawing after Ctrl-C
    when a read caught the converted error and went on (found by test_status's watch test
    in a clean-clone run)."""
    started = asyncio.Event()

    async def library_call() -> str:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if inner == "converts":
                raise OSError("connection closed") from None
            return "swallowed"
        return "done"

    async def scenario() -> str:
        async def waiter() -> str:
            try:
                return await within(5.0, library_call())
            except OSError:
                return "went on"

        task = asyncio.ensure_future(waiter())
        await started.wait()
        task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            return "cancelled"

    assert asyncio.run(scenario()) == "cancelled"
