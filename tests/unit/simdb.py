"""A simulated Cassandra for tests/unit/test_simulation.py: pure Python, no I/O.

Tables are cells with last-write-wins by (write timestamp, value), as Cassandra resolves
them. The write path is the REAL `SettlementDb.settlement_batch`: it runs unchanged against
stand-in statements, and the LOGGED batch it builds is turned back into row mutations
using the column lists of its own CQL text (settler.db._CQL). The reads are the
equivalents of `SettlementDb.load_user` and `SettlementDb.settled` over the same cells.

What a LOGGED batch guarantees, and what it does not, is up to the caller: a `Mutation` is
one row write; mutations of the same `replica_key` (table, partition key) are applied
together and isolated, as Cassandra applies one partition's share of a batch; different
partitions of one batch may become visible at different moments (not isolated).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from unittest import mock

from cassandra.query import BatchType

import settler.db
from settler.db import SettlementDb
from settler.ledger import SettledRecord, StoredRow, Write
from settler.settlement import Balance

# Primary keys of the tables the settlement batch writes (schema/002_balances.cql,
# schema/003_events.cql): (partition key columns, clustering columns).
PRIMARY_KEYS: Final = {
    "user_balances": (("user_id",), ("asset_id",)),
    "trades": (("bucket",), ("trade_id",)),
    "balance_events": (("bucket",), ("event_id",)),
}

_INSERT = re.compile(
    r"INSERT INTO \{ks\}\.(?P<table>\w+) \((?P<columns>[^)]*)\) VALUES \([?, ]*\)"
    r" USING TIMESTAMP \?$"
)


def _insert_columns(cql: str) -> tuple[str, tuple[str, ...]]:
    match = _INSERT.match(cql)
    assert match is not None, f"not an INSERT ... USING TIMESTAMP ?: {cql}"
    columns = tuple(column.strip() for column in match["columns"].split(","))
    return match["table"], (*columns, "timestamp")


_STATEMENTS: Final = {
    name: _insert_columns(text) for name, text in settler.db._CQL.items()
    if text.startswith("INSERT")
}


@dataclass(frozen=True, slots=True)
class Mutation:
    """One row write of a batch: its cells, all with the batch's timestamp."""

    table: str
    partition: tuple[Any, ...]
    clustering: tuple[Any, ...]
    cells: tuple[tuple[str, Any], ...]
    timestamp: int

    @property
    def replica_key(self) -> tuple[str, tuple[Any, ...]]:
        """The unit Cassandra applies atomically and in isolation: one table partition."""
        return self.table, self.partition


def _frozen(value: Any) -> Any:
    """Cell values as comparable, hashable Python values (a frozen map is one cell)."""
    if isinstance(value, Mapping):
        return tuple(sorted(value.items()))
    return value


def _mutation(statement: str, parameters: Sequence[Any]) -> Mutation:
    table, columns = _STATEMENTS[statement]
    values = dict(zip(columns, parameters, strict=True))
    timestamp = values.pop("timestamp")
    partition_columns, clustering_columns = PRIMARY_KEYS[table]
    partition = tuple(values.pop(column) for column in partition_columns)
    clustering = tuple(values.pop(column) for column in clustering_columns)
    cells = tuple((column, _frozen(value)) for column, value in values.items())
    return Mutation(table, partition, clustering, cells, timestamp)


class _RecordedBatch:
    """Stands in for cassandra's BatchStatement: keeps (statement, parameters) in order."""

    def __init__(self, batch_type: Any) -> None:
        self.batch_type = batch_type
        self.statements: list[tuple[str, tuple[Any, ...]]] = []

    def add(self, statement: str, parameters: Sequence[Any]) -> None:
        self.statements.append((statement, tuple(parameters)))


class _Statements:
    """Stands in for a SettlementDb: statement names instead of prepared statements."""

    _prepared: Final = {name: name for name in _STATEMENTS}
    _add_record = SettlementDb._add_record


_STAND_IN: Final = _Statements()


def batch_mutations(writes: Sequence[Write], *, fee_account: int, timestamp: int
                    ) -> list[Mutation]:
    """The row writes of the ONE LOGGED batch the real `settlement_batch` builds."""
    with mock.patch.object(settler.db, "BatchStatement", _RecordedBatch):
        batch = SettlementDb.settlement_batch(
            _STAND_IN,  # type: ignore[arg-type]
            writes, fee_account=fee_account, timestamp=timestamp,
        )
    assert isinstance(batch, _RecordedBatch)
    assert batch.batch_type is BatchType.LOGGED
    return [_mutation(statement, parameters) for statement, parameters in batch.statements]


Cell = tuple[int, Any]  # (write timestamp, value)


def _wins(new: Cell, old: Cell | None) -> bool:
    """Last write wins; on equal timestamps the greater value (as Cassandra compares
    cell values when timestamps tie)."""
    if old is None or new[0] != old[0]:
        return old is None or new[0] > old[0]
    return bool(new[1] is not None and (old[1] is None or new[1] > old[1]))


Row = dict[str, Cell]


class SimDb:
    """table -> partition key -> clustering key -> column -> (timestamp, value)."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[tuple[Any, ...], dict[tuple[Any, ...], Row]]] = {
            table: {} for table in PRIMARY_KEYS
        }

    def apply(self, mutations: Iterable[Mutation]) -> int:
        """Apply row writes; returns how many of their cells lost to newer ones."""
        stale = 0
        for mutation in mutations:
            partition = self.tables[mutation.table].setdefault(mutation.partition, {})
            row = partition.setdefault(mutation.clustering, {})
            for column, value in mutation.cells:
                cell = (mutation.timestamp, value)
                if _wins(cell, row.get(column)):
                    row[column] = cell
                else:
                    stale += 1
        return stale

    def copy(self) -> SimDb:
        other = SimDb()
        other.tables = {
            table: {key: {row_key: dict(row) for row_key, row in partition.items()}
                    for key, partition in partitions.items()}
            for table, partitions in self.tables.items()
        }
        return other

    # -- the worker's reads (SettlementDb.load_user / SettlementDb.settled) ---------------

    def load_user(self, user_id: int) -> dict[int, StoredRow]:
        rows = self.tables["user_balances"].get((user_id,), {})
        return {
            asset_id: StoredRow(
                Balance(row["available"][1], row["frozen"][1], row["version"][1],
                        row["updated_at"][1]),
                dict(row["applied"][1] or ()),
            )
            for (asset_id,), row in sorted(rows.items())
        }

    def settled(self, is_trade: bool, bucket: int, low: int, high: int) -> list[SettledRecord]:
        rows = self.tables["trades" if is_trade else "balance_events"].get((bucket,), {})
        return [
            SettledRecord(event_id, row["digest"][1], row["source"][1])
            for (event_id,), row in sorted(rows.items())
            if low <= event_id <= high
        ]

    # -- what the test checks ------------------------------------------------------------

    def balances(self) -> dict[tuple[int, int], tuple[int, int, int, int]]:
        """(user, asset) -> (available, frozen, version, updated_at)."""
        return {
            (user_id, asset_id): (row["available"][1], row["frozen"][1], row["version"][1],
                                  row["updated_at"][1])
            for (user_id,), partition in self.tables["user_balances"].items()
            for (asset_id,), row in partition.items()
        }

    def records(self, is_trade: bool) -> dict[int, tuple[bytes, str]]:
        """Settled id -> (digest, source)."""
        return {
            event_id: (row["digest"][1], row["source"][1])
            for partition in self.tables["trades" if is_trade else "balance_events"].values()
            for (event_id,), row in partition.items()
        }
