"""SettlementDb: every settlement statement's CQL text, prepared once, and the reads; the
write path's batches (settler.store.batches) go out through `run`.

Library use (other services):

    db = await SettlementDb.open(load_settings())
    balances = await db.get_user_all_balances(1001)   # one single-partition query
    await db.close()
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from cassandra.cluster import Cluster, Session
from cassandra.query import BatchStatement, BatchType, PreparedStatement

from settler.config import Settings
from settler.core.lineage import Claim, Resolved, Row
from settler.store import cql
from settler.store.batches import ID_BUCKET_BITS, PROGRESS_SCOPE, Batch


def id_bucket(event_id: int) -> int:
    return event_id >> ID_BUCKET_BITS


def _claim_kind(is_trade: bool) -> str:
    return "trade" if is_trade else "balance"


@dataclass(frozen=True, slots=True)
class UserBalance:
    """One row of user_balances, in raw units of its asset."""

    user_id: int
    asset_id: int
    available: int
    frozen: int
    version: int
    updated_at: int


@dataclass(frozen=True, slots=True)
class Progress:
    """The writer's progress records (schema/003_events.cql, table progress)."""

    frontier: Mapping[str, int] = field(default_factory=dict)
    committed: Mapping[str, int] = field(default_factory=dict)
    resolved: Resolved = field(default_factory=Resolved)


_BALANCE_COLUMNS = "asset_id, available, frozen, version, updated_at"

_CQL: Final = {
    "all_balances": f"SELECT {_BALANCE_COLUMNS} FROM {{ks}}.user_balances WHERE user_id = ?",
    "one_balance": (
        f"SELECT {_BALANCE_COLUMNS} FROM {{ks}}.user_balances WHERE user_id = ? AND asset_id = ?"
    ),
    "load_user": (
        f"SELECT {_BALANCE_COLUMNS}, lineage FROM {{ks}}.user_balances WHERE user_id = ?"
    ),
    "write_balance": (
        "INSERT INTO {ks}.user_balances (user_id, asset_id, available, frozen, version,"
        " updated_at, lineage) VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
    ),
    "write_trade": (
        "INSERT INTO {ks}.trades (bucket, trade_id, symbol, buy_order_id, sell_order_id,"
        " buyer_user_id, seller_user_id, base_asset_id, quote_asset_id, price, quantity,"
        " cost, buyer_refund, seller_refund, buyer_fee, seller_fee, fee_account,"
        " match_seq, executed_at, digest, source)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " USING TIMESTAMP ?"
    ),
    "write_balance_event": (
        "INSERT INTO {ks}.balance_events (bucket, event_id, kind, user_id, asset_id, amount, ts,"
        " digest, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
    ),
    "claims": (
        "SELECT event_id, digest, source, epoch, batch_no, rows_applied FROM {ks}.id_claims"
        " WHERE kind = ? AND bucket = ? AND event_id >= ? AND event_id <= ?"
    ),
    "write_claim": (
        "INSERT INTO {ks}.id_claims (kind, bucket, event_id, digest, source, epoch, batch_no,"
        " rows_applied) VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
    ),
    "progress": (
        "SELECT name, stream, position, epoch FROM {ks}.progress WHERE scope = ?"
    ),
    "write_progress": (
        "INSERT INTO {ks}.progress (scope, name, stream, position, epoch)"
        " VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
    ),
}

class BatchWriter(Protocol):
    async def execute(self, batch: Batch) -> None: ...

    async def query(self, name: str, parameters: tuple[Any, ...]) -> list[tuple[Any, ...]]: ...

    async def close(self) -> None: ...


class SettlementDb:
    """Prepared statements over one session bound to the settlement keyspace."""

    def __init__(self, cluster: Cluster, session: Session) -> None:
        self.cluster = cluster
        self.session = session
        # Settlement batches through another driver (acsylla), when one is attached.
        self.writer: BatchWriter | None = None
        self._prepared: dict[str, PreparedStatement] = {
            # Table names are qualified: Cassandra 5 warns against prepared statements
            # that lean on the session's `USE <keyspace>`.
            name: session.prepare(text.format(ks=session.keyspace)) for name, text in _CQL.items()
        }

    @classmethod
    async def open(cls, settings: Settings) -> SettlementDb:
        def connect_and_prepare() -> SettlementDb:
            cluster, session = cql.connect(settings, keyspace=settings.keyspace)
            try:
                return cls(cluster, session)
            except Exception:
                cluster.shutdown()
                raise

        return await asyncio.to_thread(connect_and_prepare)

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.close()
        # In a daemon thread: with a node frozen the driver's shutdown can take its
        # heartbeat timeout, and a caller that stops waiting must not be held at exit.
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def shutdown() -> None:
            self.cluster.shutdown()
            loop.call_soon_threadsafe(finished)

        threading.Thread(target=shutdown, name="cql-shutdown", daemon=True).start()
        await done

    def worker_statements(self) -> dict[str, str]:
        """The CQL text of every statement of the writer's hot path: what its batches hold
        and what it reads while planning."""
        return {name: text.format(ks=self.session.keyspace) for name, text in _CQL.items()
                if text.startswith("INSERT") or name in ("load_user", "claims", "progress")}

    def statement(self, name: str) -> PreparedStatement:
        return self._prepared[name]

    async def run(self, statement: Any, parameters: Any = None) -> Any:
        if isinstance(statement, Batch):
            if self.writer is not None:
                await self.writer.execute(statement)
                return []
            statement = self.driver_batch(statement)
        return await cql.run(self.session, statement, parameters)

    async def read(self, name: str, parameters: tuple[Any, ...]) -> Any:
        """The rows of one of the worker's reads (every page), through the write path's
        driver when one is attached."""
        if self.writer is not None:
            return await self.writer.query(name, parameters)
        return cql.rows_of(await self.run(self._prepared[name], parameters))

    def driver_batch(self, batch: Batch) -> BatchStatement:
        driver = BatchStatement(BatchType.LOGGED if batch.logged else BatchType.UNLOGGED)
        prepared = self._prepared
        for name, values in batch.statements:
            driver.add(prepared[name], values)
        return driver

    # -- reads for people and other services -------------------------------------------

    async def get_user_all_balances(self, user_id: int) -> list[UserBalance]:
        """Every asset balance of a user, ordered by asset id: one single-partition query."""
        rows = cql.rows_of(await self.run(self._prepared["all_balances"], (user_id,)))
        return [UserBalance(user_id, *row) for row in rows]

    async def get_user_balance(self, user_id: int, asset_id: int) -> UserBalance | None:
        rows = cql.rows_of(await self.run(self._prepared["one_balance"], (user_id, asset_id)))
        first = next(iter(rows), None)
        return None if first is None else UserBalance(user_id, *first)

    # -- the worker's reads ----------------------------------------------------------------

    async def load_user(self, user_id: int) -> dict[int, Row]:
        """All rows of one user with their lineage (one partition read)."""
        rows = await self.read("load_user", (user_id,))
        return {
            asset_id: Row(available, frozen, version, updated_at, dict(lineage or {}))
            for asset_id, available, frozen, version, updated_at, lineage in rows
        }

    async def claims(self, is_trade: bool, bucket: int, low: int, high: int) -> list[Claim]:
        """Claimed ids between low and high (inclusive) inside one id bucket."""
        rows = await self.read("claims", (_claim_kind(is_trade), bucket, low, high))
        return [
            Claim(event_id, digest, source, epoch or 0, batch or 0, rows_applied or 0)
            for event_id, digest, source, epoch, batch, rows_applied in rows
        ]

    async def progress(self) -> Progress:
        rows = await self.read("progress", (PROGRESS_SCOPE,))
        kinds: dict[str, dict[str, int]] = {"frontier": {}, "committed": {}, "resolved": {}}
        epoch = 0
        for name, stream, position, row_epoch in rows:
            if name == "resolved" and stream == "":
                epoch = row_epoch or 0
            elif name in kinds and position is not None:
                kinds[name][stream] = position
        return Progress(kinds["frontier"], kinds["committed"],
                        Resolved(epoch, kinds["resolved"]) if epoch else Resolved())
