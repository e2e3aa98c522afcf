"""A simulated Cassandra's cells for the crash simulation: pure Python, no I/O.

Tables are cells with last-write-wins by (write timestamp, value), as Cassandra resolves
them. Batches built by the REAL builders of settler.store.batches (`Batch`: statement
names and bound values) are turned back into row mutations using the column lists of
their own CQL text (settler.store.db._CQL); the REAL reads (`load_user`, `claims`, `progress`)
run their own SELECT text over the same cells.

What a batch guarantees, and what it does not, is up to the caller: a `Mutation` is one
row write; mutations of the same `replica_key` (table, partition key) are applied
together and isolated, as Cassandra applies one partition's share of a batch; different
partitions of one batch may become visible at different moments (not isolated).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import settler.store.db
from settler.store.batches import Batch

# Primary keys of the tables the worker writes and reads (schema/002_balances.cql,
# schema/003_events.cql): (partition key columns, clustering columns).
PRIMARY_KEYS: Final = {
    "user_balances": (("user_id",), ("asset_id",)),
    "trades": (("bucket",), ("trade_id",)),
    "balance_events": (("bucket",), ("event_id",)),
    "id_claims": (("kind", "bucket"), ("event_id",)),
    "progress": (("scope",), ("name", "stream")),
}

_INSERT = re.compile(
    r"INSERT INTO \{ks\}\.(?P<table>\w+) \((?P<columns>[^)]*)\) VALUES \([?, ]*\)"
    r" USING TIMESTAMP \?$"
)
_SELECT = re.compile(
    r"SELECT (?P<columns>.+?) FROM \{ks\}\.(?P<table>\w+) WHERE (?P<where>.+)$"
)
_CONDITION = re.compile(r"(?P<column>\w+) (?P<op>=|<=|>=|<|>) \?$")
_OPS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "=": operator.eq, "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt,
}


def _columns(text: str) -> tuple[str, ...]:
    return tuple(column.strip() for column in text.split(","))


def _insert_columns(cql: str) -> tuple[str, tuple[str, ...]]:
    match = _INSERT.match(cql)
    assert match is not None, f"not an INSERT ... USING TIMESTAMP ?: {cql}"
    return match["table"], (*_columns(match["columns"]), "timestamp")


def _select(cql: str) -> tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(table, selected columns, (column, operator) per bound parameter)."""
    match = _SELECT.match(cql)
    assert match is not None, f"not a SELECT ... WHERE: {cql}"
    conditions = []
    for condition in match["where"].split(" AND "):
        parsed = _CONDITION.match(condition.strip())
        assert parsed is not None, f"condition not simulated: {condition!r} in {cql}"
        conditions.append((parsed["column"], parsed["op"]))
    table = match["table"]
    assert table in PRIMARY_KEYS, f"table not simulated: {table}"
    return table, _columns(match["columns"]), tuple(conditions)


_STATEMENTS: Final = {
    name: _insert_columns(text) for name, text in settler.store.db._CQL.items()
    if text.startswith("INSERT")
}
_QUERIES: Final = {
    name: _select(text) for name, text in settler.store.db._CQL.items() if text.startswith("SELECT")
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


def mutations(batch: Batch) -> list[Mutation]:
    """The row writes of a batch built by the real SettlementDb builders."""
    return [_mutation(name, values) for name, values in batch.statements]


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

    def select(self, statement: str, parameters: Sequence[Any]) -> list[tuple[Any, ...]]:
        """One of settler.store.db's SELECTs: equality on the whole partition key, any
        comparison on clustering columns; rows in clustering order."""
        table, columns, conditions = _QUERIES[statement]
        partition_columns, clustering_columns = PRIMARY_KEYS[table]
        equal, checks = {}, []
        for (column, op), value in zip(conditions, parameters, strict=True):
            if column in partition_columns:
                assert op == "=", f"{statement}: {column} {op} on a partition key column"
                equal[column] = value
            else:
                checks.append((clustering_columns.index(column), _OPS[op], value))
        partition = tuple(equal[column] for column in partition_columns)
        rows = self.tables[table].get(partition, {})
        matches = sorted(clustering for clustering in rows
                         if all(op(clustering[i], value) for i, op, value in checks))
        result = []
        for clustering in matches:
            key = {**dict(zip(partition_columns, partition, strict=True)),
                   **dict(zip(clustering_columns, clustering, strict=True))}
            row = rows[clustering]
            result.append(tuple(
                key[column] if column in key else row[column][1] if column in row else None
                for column in columns
            ))
        return result

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
        """Settled id (trades / balance_events) -> (digest, source)."""
        return {
            event_id: (row["digest"][1], row["source"][1])
            for partition in self.tables["trades" if is_trade else "balance_events"].values()
            for (event_id,), row in partition.items()
        }

    def claims(self, is_trade: bool) -> dict[int, tuple[bytes, str]]:
        """Claimed id (id_claims) -> (digest, source)."""
        kind = settler.store.db._claim_kind(is_trade)
        return {
            event_id: (row["digest"][1], row["source"][1])
            for (claim_kind, _), partition in self.tables["id_claims"].items()
            if claim_kind == kind
            for (event_id,), row in partition.items()
        }
