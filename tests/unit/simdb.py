"""A simulated Cassandra for tests/unit/test_simulation.py: pure Python, no I/O.

Tables are cells with last-write-wins by (write timestamp, value), as Cassandra resolves
them. The write path is the REAL `SettlementDb.settlement_batch` and
`SettlementDb.claims_batch`: they run unchanged against stand-in statements, and the
batches they build are turned back into row mutations using the column lists of their own
CQL text (settler.db._CQL). The reads are the REAL `SettlementDb.load_user` and
`SettlementDb.settled`, run against a stand-in session that evaluates their own SELECT
text (settler.db._CQL) over the same cells: `settled` reads `id_claims` because the real
one does.

What a batch guarantees, and what it does not, is up to the caller: a `Mutation` is one
row write; mutations of the same `replica_key` (table, partition key) are applied
together and isolated, as Cassandra applies one partition's share of a batch; different
partitions of one batch may become visible at different moments (not isolated). A LOGGED
batch that reached the batchlog is eventually applied whole; an UNLOGGED one has no
batchlog: at a crash, a partition's share may simply never be applied.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from unittest import mock

from cassandra.query import BatchType

import settler.db
from settler.db import SettlementDb
from settler.ledger import SettledRecord, StoredRow, Write

T = TypeVar("T")

# Primary keys of the tables the worker writes and reads (schema/002_balances.cql,
# schema/003_events.cql): (partition key columns, clustering columns).
PRIMARY_KEYS: Final = {
    "user_balances": (("user_id",), ("asset_id",)),
    "trades": (("bucket",), ("trade_id",)),
    "balance_events": (("bucket",), ("event_id",)),
    "id_claims": (("kind", "bucket"), ("event_id",)),
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
    name: _insert_columns(text) for name, text in settler.db._CQL.items()
    if text.startswith("INSERT")
}
_QUERIES: Final = {
    name: _select(text) for name, text in settler.db._CQL.items() if text.startswith("SELECT")
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


class _StandIn:
    """Stands in for a SettlementDb: statement names instead of prepared statements, and a
    `run` that evaluates the named SELECT over a SimDb's cells."""

    _prepared: Final = {name: name for name in (*_STATEMENTS, *_QUERIES)}
    _add_record = SettlementDb._add_record

    def __init__(self, db: SimDb | None = None) -> None:
        self.db = db

    async def run(self, statement: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        assert self.db is not None
        return self.db.select(statement, parameters)


_WRITER: Final = _StandIn()


def _built(build: Callable[[], Any], batch_type: BatchType) -> list[Mutation]:
    with mock.patch.object(settler.db, "BatchStatement", _RecordedBatch):
        batch = build()
    if batch is None:
        return []
    assert isinstance(batch, _RecordedBatch)
    assert batch.batch_type is batch_type
    return [_mutation(statement, parameters) for statement, parameters in batch.statements]


def batch_mutations(writes: Sequence[Write], *, fee_account: int, timestamp: int
                    ) -> list[Mutation]:
    """The row writes of the ONE LOGGED batch the real `settlement_batch` builds."""
    return _built(lambda: SettlementDb.settlement_batch(
        _WRITER,  # type: ignore[arg-type]
        writes, fee_account=fee_account, timestamp=timestamp,
    ), BatchType.LOGGED)


def claim_mutations(writes: Sequence[Write], *, timestamp: int) -> list[Mutation]:
    """The row writes of the UNLOGGED batch the real `claims_batch` builds (none when no
    write claims an id: the real one returns None, nothing is sent)."""
    return _built(lambda: SettlementDb.claims_batch(
        _WRITER,  # type: ignore[arg-type]
        writes, timestamp=timestamp,
    ), BatchType.UNLOGGED)


def _complete(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (its I/O is the simulated `run`)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise AssertionError("a simulated read suspended")


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
        """One of settler.db's SELECTs: equality on the whole partition key, any
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

    # -- the worker's reads: the real SettlementDb.load_user / SettlementDb.settled -------

    def load_user(self, user_id: int) -> dict[int, StoredRow]:
        return _complete(SettlementDb.load_user(_StandIn(self), user_id))  # type: ignore[arg-type]

    def settled(self, is_trade: bool, bucket: int, low: int, high: int) -> list[SettledRecord]:
        return _complete(SettlementDb.settled(
            _StandIn(self), is_trade, bucket, low, high))  # type: ignore[arg-type]

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
        kind = settler.db._claim_kind(is_trade)
        return {
            event_id: (row["digest"][1], row["source"][1])
            for (claim_kind, _), partition in self.tables["id_claims"].items()
            if claim_kind == kind
            for (event_id,), row in partition.items()
        }
