"""Replay (`settler replay`): rewind a consumer group's committed offsets, then watch the
worker catch up again.

Rewinding commits new offsets for the group from a consumer that assigns the partitions
itself. Kafka takes such a commit only while the group has no active member, and a running
worker would overwrite it anyway, so the group is checked first. The worker tolerates a
replay by design: every re-read event is a duplicate and is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError, IllegalGenerationError, UnknownMemberIdError

from settler import kafka
from settler.config import Settings
from settler.store import cql


class ReplayError(Exception):
    """The replay cannot be done as asked; the message says why and what to do."""


class ActiveMembers(ReplayError):
    def __init__(self, group: str, state: str, members: Sequence[str]) -> None:
        hosts = ", ".join(members)
        super().__init__(
            f"consumer group {group!r} has {len(members)} active member(s) (state {state}: "
            f"{hosts}); stop every `settler run` of this group first (standbys too, or one "
            "takes over), or pass --force to try anyway"
        )
        self.group = group
        self.members = list(members)


@dataclass(frozen=True)
class Start:
    """Where to rewind to: an offset (clamped to what the partition still has) or a time."""

    offset: int | None = None
    time_ms: int | None = None

    def __post_init__(self) -> None:
        if (self.offset is None) == (self.time_ms is None):
            raise ValueError("give exactly one of offset and time_ms")


@dataclass(frozen=True)
class Rewind:
    """One partition's rewind: committed before, committed now, the end to catch up to."""

    tp: TopicPartition
    previous: int | None
    offset: int
    end: int

    @property
    def to_read(self) -> int:
        return max(0, self.end - self.offset)


def admin_client(settings: Settings) -> AIOKafkaAdminClient:
    return kafka.admin(settings, client_id="settler-replay")


async def topic_partitions(settings: Settings, topic: str) -> list[int]:
    """The partition ids of a topic, [] if it does not exist (also used by `settler dlq`)."""
    admin = admin_client(settings)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sorted(
        p["partition"] for t in described if t.get("topic") == topic and not t.get("error_code")
        for p in t.get("partitions", ())
    )


async def group_members(settings: Settings, group: str) -> tuple[str, list[str]]:
    """The group's state and its members as `client_id@host`."""
    admin = admin_client(settings)
    await admin.start()
    try:
        responses = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    for response in responses:
        for described in response.groups:
            _error, group_id, state, _ptype, _protocol, members = described[:6]
            if group_id == group:
                return state, [f"{m[1]}@{str(m[2]).lstrip('/')}" for m in members]
    return "Dead", []


async def committed_offsets(settings: Settings, group: str) -> dict[TopicPartition, int]:
    admin = admin_client(settings)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


async def rewind(settings: Settings, *, group: str, start: Start, topics: Sequence[str],
                 partitions: Sequence[int] | None = None, force: bool = False) -> list[Rewind]:
    """Commit `start` as the group's offset of each chosen partition; returns what moved."""
    state, members = await group_members(settings, group)
    if members and not force:
        raise ActiveMembers(group, state, members)
    await asyncio.to_thread(remember_committed, settings, await committed_offsets(settings,
                                                                                 group))
    consumer = kafka.consumer(settings, group_id=group, client_id="settler-replay")
    await consumer.start()
    try:
        tps = await _partitions(settings, topics, partitions)
        rewinds = await _targets(consumer, tps, start)
        consumer.assign(tps)
        try:
            await consumer.commit({r.tp: r.offset for r in rewinds})
        except (CommitFailedError, IllegalGenerationError, UnknownMemberIdError) as exc:
            raise ReplayError(
                f"Kafka refused the new offsets of group {group!r} ({type(exc).__name__}): "
                "a member is active; stop the workers of this group and retry"
            ) from None
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            # aiokafka 0.14 may re-raise a CancelledError of its own task on stop.
            await consumer.stop()
    return rewinds


def remember_committed(settings: Settings, committed: dict[TopicPartition, int]) -> None:
    """Before a rewind, raise the keyspace's record of the highest offsets ever committed
    (table progress, name 'committed') to where the group is now: the worker then marks
    every dead letter it publishes again below them as a replay (settler.ops.replay)."""
    if not committed:
        return
    cluster, session = cql.connect(settings, keyspace=settings.keyspace)
    try:
        rows = session.execute(
            "SELECT stream, position, WRITETIME(position) FROM progress"
            " WHERE scope = 'writer' AND name = 'committed'", timeout=30)
        known = {stream: (position or 0, written or 0) for stream, position, written in rows}
        latest = max((written for _, written in known.values()), default=0)
        timestamp = max(time.time_ns() // 1000, latest + 1)
        insert = session.prepare(
            "INSERT INTO progress (scope, name, stream, position) VALUES ('writer',"
            " 'committed', ?, ?) USING TIMESTAMP ?")
        for tp, offset in committed.items():
            stream = f"{tp.topic}:{tp.partition}"
            if offset > known.get(stream, (-1, 0))[0]:
                session.execute(insert, (stream, offset, timestamp), timeout=30)
    finally:
        cluster.shutdown()


async def _partitions(settings: Settings, topics: Sequence[str],
                      partitions: Sequence[int] | None) -> list[TopicPartition]:
    chosen: list[TopicPartition] = []
    for topic in topics:
        available = await topic_partitions(settings, topic)
        if not available:
            raise ReplayError(f"topic {topic!r} does not exist (or has no partitions)")
        wanted = sorted(available) if partitions is None else sorted(set(partitions))
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ReplayError(f"topic {topic!r} has no partition {missing[0]} "
                              f"(it has 0..{max(available)})")
        chosen += [TopicPartition(topic, p) for p in wanted]
    return chosen


async def _targets(consumer: AIOKafkaConsumer, tps: list[TopicPartition], start: Start
                   ) -> list[Rewind]:
    beginnings: dict[TopicPartition, int] = await consumer.beginning_offsets(tps)
    ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
    if start.time_ms is not None:
        found: dict[TopicPartition, Any] = await consumer.offsets_for_times(
            dict.fromkeys(tps, start.time_ms))
        # No record at or after the time: nothing to replay there, go to the end.
        wanted = {tp: ends[tp] if found.get(tp) is None else found[tp].offset for tp in tps}
    else:
        assert start.offset is not None
        wanted = dict.fromkeys(tps, start.offset)
    rewinds = []
    for tp in tps:
        previous = await consumer.committed(tp)
        # Below the log start the records are gone (retention); past the end there is nothing.
        offset = min(max(wanted[tp], beginnings[tp]), ends[tp])
        rewinds.append(Rewind(tp, previous, offset, ends[tp]))
    return rewinds


@dataclass(frozen=True)
class CatchUp:
    done: int
    total: int

    @property
    def complete(self) -> bool:
        return self.done >= self.total


def catch_up(rewinds: Sequence[Rewind], committed: dict[TopicPartition, int]) -> CatchUp:
    """How many of the replayed records the group has committed again."""
    done = sum(
        min(max(committed.get(r.tp, r.offset), r.offset), r.end) - r.offset for r in rewinds
    )
    return CatchUp(done, sum(r.to_read for r in rewinds))


async def watch(settings: Settings, group: str, rewinds: Sequence[Rewind],
                on_progress: Callable[[CatchUp], None], *, poll_s: float = 1.0,
                timeout_s: float | None = None) -> CatchUp:
    """Poll the group's committed offsets until every rewound partition is back at the end
    it had when rewound (or `timeout_s` passes); returns the last state seen."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    admin = admin_client(settings)
    await admin.start()
    try:
        while True:
            offsets = await admin.list_consumer_group_offsets(group)
            committed = {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
            state = catch_up(rewinds, committed)
            on_progress(state)
            if state.complete or (deadline is not None and time.monotonic() > deadline):
                return state
            await asyncio.sleep(poll_s)
    finally:
        await admin.close()
