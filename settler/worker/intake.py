"""Intake: fetch records, decode them, and load what planning them needs.

Bytes -> `decode` -> Event | Rejected -> `effect_of` (validated) -> Item. Before planning,
the rows of users not in memory (one partition read per user) and the claims of ids not
remembered (one slice query per id bucket, not one read per event) are loaded. A read
error is never taken for "no rows": reads are retried until they answer.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Coroutine
from typing import Any, Final, NamedTuple

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from settler import logs, metrics
from settler.core.events import Event, Rejected, decode
from settler.core.ledger import Ledger
from settler.core.lineage import Position
from settler.core.offsets import Offsets
from settler.core.settlement import Effect
from settler.store.db import id_bucket
from settler.worker.ports import Consumer, Store
from settler.worker.retry import Retrier

log = logs.get("settler.worker")

FETCH_TIMEOUT_MS: Final = 200
FETCH_RETRY_S: Final = 1.0
LOAD_CONCURRENCY: Final = 64


class Item(NamedTuple):
    """One fetched record on its way through the pipeline."""

    tp: TopicPartition
    record: ConsumerRecord[Any, Any]
    position: Position
    event: Event | Rejected
    effect: Effect | Rejected


class Intake:
    def __init__(self, consumer: Consumer, store: Store, ledger: Ledger,
                 offsets: Offsets[TopicPartition], retrier: Retrier, max_records: int) -> None:
        self.consumer = consumer
        self.store = store
        self.ledger = ledger
        self.offsets = offsets
        self.retrier = retrier
        self.max_records = max_records

    async def fetch(self) -> dict[TopicPartition, list[ConsumerRecord[Any, Any]]]:
        try:
            return await self.consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS,
                                               max_records=self.max_records)
        except KafkaError as exc:
            metrics.retry("kafka_fetch")
            self.retrier.report("kafka_fetch", ok=False)
            log.warning("fetch failed, retrying", error=repr(exc))
            await self.retrier.sleep(FETCH_RETRY_S)
            return {}

    def items(self, fetched: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]
              ) -> list[Item]:
        """Track each record's offset (it may be committed only once settled) and decode."""
        items: list[Item] = []
        ledger, offsets = self.ledger, self.offsets
        for tp, records in fetched.items():
            for record in records:
                offsets.track(tp, record.offset)
                event = decode(record.value)
                effect = event if isinstance(event, Rejected) else ledger.effect(event)
                items.append(Item(tp, record, Position(tp.topic, tp.partition, record.offset),
                                  event, effect))
        return items

    async def load(self, items: list[Item]) -> None:
        """Bring into memory what planning these items needs."""
        ledger = self.ledger
        events = [item.event for item in items if not isinstance(item.event, Rejected)]
        effects = [item.effect for item in items if isinstance(item.effect, Effect)]
        ranges: dict[tuple[bool, int], list[int]] = defaultdict(list)
        for is_trade, event_id in ledger.unknown_ids(events):
            ranges[(is_trade, id_bucket(event_id))].append(event_id)
        users = sorted(ledger.missing_users(effects))
        if not ranges and not users:
            return
        gate = asyncio.Semaphore(LOAD_CONCURRENCY)
        store, retrier = self.store, self.retrier

        async def load_claims(is_trade: bool, bucket: int, ids: list[int]) -> None:
            async with gate:
                claims = await retrier.run(
                    "cql_read", lambda: store.claims(is_trade, bucket, min(ids), max(ids)))
            ledger.add_claims(is_trade, claims)

        async def load_user(user_id: int) -> None:
            async with gate:
                rows = await retrier.run("cql_read", lambda: store.load_user(user_id))
            ledger.add_user(user_id, rows)

        await all_or_none([
            *(load_claims(is_trade, bucket, ids) for (is_trade, bucket), ids in ranges.items()),
            *(load_user(user_id) for user_id in users),
        ])


async def all_or_none(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    """Run concurrently; the first failure cancels the others and is raised as itself."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
