"""Landing: claims, then ONE LOGGED batch per group, retried until durable -> settled.

The rules this module enforces (ARCHITECTURE.md "Why exactly once"):
- Claims before effects: a group's LOGGED batch is sent only once its own claims and those
  of every earlier group are acknowledged (`land`, the claims chain).
- A batch is re-sent, never re-planned: retries carry the same cells and timestamp.
- Write and settle only while the lease is valid: every attempt checks validity before it
  is sent, and an acknowledgement that arrives after validity lapsed settles nothing.
- Too large: a batch the database rejects as too large is split in two, each part
  carrying its own events' records and rows (at the group's final values), down to one
  event; one event alone too large ends the worker (exit 1).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from aiokafka import TopicPartition
from cassandra import InvalidRequest

from settler import logs, metrics
from settler.core.events import kind
from settler.core.ledger import Group, Ledger, Write
from settler.core.offsets import Offsets
from settler.core.registry import Registry
from settler.store import batches
from settler.worker.intake import all_or_none
from settler.worker.ports import Store
from settler.worker.retry import Retrier, Stopping
from settler.worker.tenure import Lapsed, Tenure

log = logs.get("settler.worker")


class Fatal(Exception):
    """A non-retryable error: the session ends, nothing more is committed, exit 1."""


class BatchTooLarge(Fatal):
    pass


def too_large(exc: BaseException) -> bool:
    return isinstance(exc, InvalidRequest) and "too large" in str(exc).lower()


class Landing:
    def __init__(self, *, ledger: Ledger, store: Store, offsets: Offsets[TopicPartition],
                 tenure: Tenure, retrier: Retrier, registry: Registry,
                 ended: asyncio.Event) -> None:
        self.ledger = ledger
        self.store = store
        self.offsets = offsets
        self.tenure = tenure
        self.retrier = retrier
        self.registry = registry
        self.ended = ended
        self.fatal: BaseException | None = None
        # Some group was given up without its acknowledgement: it may still land (a
        # batchlog replay), so the session is not clean whatever the drain says.
        self.abandoned = False

    async def _send(self, statement: Any) -> None:
        if not self.tenure.valid:
            raise Stopping  # never write without a valid lease; the next writer re-reads
        await self.store.run(statement)

    async def land(self, group: Group, produced_ms: list[int], claims: Any, timestamp: int,
                    after: asyncio.Future[None] | None, claimed: asyncio.Future[None]) -> None:
        """Make the group's claims durable, wait until every earlier group's claims are
        too, then execute its batch until it is durable; settle its events only if the
        lease was still valid when the acknowledgement came."""
        started = time.perf_counter()
        try:
            await self.retrier.run("cql_write", lambda: self._send(claims))
            if after is not None:
                await after
            claimed.set_result(None)
            await self._send_part(group, group.writes, timestamp, whole=True)
        except (Stopping, Lapsed, asyncio.CancelledError):
            self.abandoned = True  # the next session re-reads these events
            return
        except Exception as exc:  # noqa: BLE001 - not transient: a bug, the session must end
            self._fail(exc, group)
            return
        finally:
            if not claimed.done():
                claimed.cancel()  # later groups must not go ahead of a missing claim
        if not self.tenure.valid:
            # Acknowledged too late: another writer may have read the rows before.
            self.abandoned = True
            return
        self._landed(group, produced_ms, started)

    async def _send_part(self, group: Group, writes: Sequence[Write], timestamp: int, *,
                         whole: bool = False) -> None:
        images = group.images if whole else group.images_for(writes)
        batch = batches.settlement_batch(images, writes,
                                         fee_account=self.registry.fee_account,
                                         timestamp=timestamp)
        try:
            await self.retrier.run("cql_write", lambda: self._send(batch))
        except InvalidRequest as exc:
            if not too_large(exc):
                raise
            if len(writes) == 1:
                raise BatchTooLarge(
                    f"one event alone is a batch too large for the database ({exc}): raise "
                    "batch_size_fail_threshold (Cassandra) or check the event") from exc
            metrics.BATCH_SPLITS.inc()
            half = len(writes) // 2
            log.warning("batch too large for the database, split in two and re-sent",
                        events=len(writes), error=str(exc))
            await all_or_none([self._send_part(group, writes[:half], timestamp),
                               self._send_part(group, writes[half:], timestamp)])

    def _fail(self, exc: BaseException, group: Group) -> None:
        if self.fatal is None:
            self.fatal = exc
        metrics.error("batch_too_large" if isinstance(exc, BatchTooLarge) else "cql_write")
        first = group.writes[0].position if group.writes else None
        log.error("settlement batch rejected", error=repr(exc), first_event=str(first))
        self.ended.set()

    def _landed(self, group: Group, produced_ms: list[int], started: float) -> None:
        self.ledger.landed(group)
        now = time.time()
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        offsets, observe, registry = self.offsets, metrics.SETTLE_LATENCY.observe, self.registry
        tp_of: dict[tuple[str, int], TopicPartition] = {}
        outcomes: Counter[tuple[str, str]] = Counter()
        for write, produced in zip(group.writes, produced_ms, strict=True):
            topic, partition, offset = write.position
            tp = tp_of.get((topic, partition))
            if tp is None:
                tp = tp_of[(topic, partition)] = TopicPartition(topic, partition)
            offsets.settle(tp, offset)
            observe(max(0.0, now - produced / 1000))  # from the record's produce time
            outcomes[(kind(write.event), write.outcome)] += 1
            if write.negative_rows:
                _anomalies(write, registry)
        for (event_kind, outcome), count in outcomes.items():
            metrics.event(event_kind, outcome, count=count)
        if group.writes:
            metrics.settled_at(group.writes[-1].event.time)


def _anomalies(write: Write, registry: Registry) -> None:
    """Rows left below zero: applied anyway (the engine is the authority on funds),
    counted per asset and logged once per event."""
    names = []
    for _, asset_id in write.negative_rows:
        asset = registry.asset(asset_id)
        names.append(asset.name if asset else str(asset_id))
        metrics.anomaly(names[-1])
    position = write.position
    log.warning("balance below zero after settlement",
                rows=[f"{user}:{name}" for (user, _), name in zip(write.negative_rows, names,
                                                                   strict=True)],
                topic=position.topic, partition=position.partition, offset=position.offset,
                event_id=write.event.event_id, type=kind(write.event))
