"""Reconciliation (`settler verify`): rebuild every balance from the stored trades and
balance events, and compare it with user_balances (available, frozen, version).

Every settled event's record and its balance rows were written in ONE LOGGED batch, so the
sum of the records must equal the rows. The three tables are scanned in parallel over
token ranges (`token(pk) > ? AND token(pk) <= ?`), a bounded number in flight, so a scan
scales with the cluster rather than with one coordinator's patience.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from cassandra.cluster import Cluster, Session
from cassandra.query import PreparedStatement

from settler.config import Settings
from settler.store import cql

RowKey = tuple[int, int]
"""(user_id, asset_id)"""

TOKEN_MIN: Final = -(2**63)
TOKEN_MAX: Final = 2**63 - 1
"""Murmur3Partitioner's token space; no key has TOKEN_MIN (it is normalised to TOKEN_MAX),
so the ranges (TOKEN_MIN, t1], (t1, t2], ... (tn, TOKEN_MAX] cover every row."""

DEFAULT_RANGES: Final = 64
DEFAULT_PARALLEL: Final = 8
PAGE_ROWS: Final = 5000
ATTEMPTS: Final = 5

_CQL: Final = {
    "trades": (
        "SELECT buyer_user_id, seller_user_id, base_asset_id, quote_asset_id, quantity, cost,"
        " buyer_refund, seller_refund, buyer_fee, seller_fee, fee_account"
        " FROM {keyspace}.trades WHERE token(bucket) > ? AND token(bucket) <= ?"
    ),
    "balance_events": (
        "SELECT kind, user_id, asset_id, amount FROM {keyspace}.balance_events"
        " WHERE token(bucket) > ? AND token(bucket) <= ?"
    ),
    "user_balances": (
        "SELECT user_id, asset_id, available, frozen, version FROM {keyspace}.user_balances"
        " WHERE token(user_id) > ? AND token(user_id) <= ?"
    ),
}

# SPEC §1: what each balance event does to (available, frozen).
_BALANCE_EVENT_SIGNS: Final = {
    "deposit": (1, 0),
    "withdraw": (-1, 0),
    "freeze": (-1, 1),
    "unfreeze": (1, -1),
}


@dataclass(frozen=True, slots=True)
class Figures:
    """What is compared for one balance row."""

    available: int
    frozen: int
    version: int


@dataclass(frozen=True, slots=True)
class Difference:
    """A row whose stored figures differ from the rebuilt ones (None: no such row)."""

    user_id: int
    asset_id: int
    stored: Figures | None
    rebuilt: Figures | None


@dataclass(frozen=True)
class Report:
    rows_checked: int
    trades: int
    balance_events: int
    differences: list[Difference]
    seconds: float

    @property
    def rows_scanned(self) -> int:
        return self.trades + self.balance_events + self.rows_checked

    @property
    def clean(self) -> bool:
        return not self.differences


# -- the pure part: stored records -> rebuilt rows ---------------------------------------


def trade_moves(
    *, buyer: int, seller: int, base: int, quote: int, quantity: int, cost: int,
    buyer_refund: int, seller_refund: int, buyer_fee: int, seller_fee: int, fee_account: int,
) -> dict[RowKey, tuple[int, int]]:
    """SPEC §3 restated from a stored trade row: (available, frozen) moved per row.

    Deliberately apart from settler.core.settlement: it uses the cost and fee account stored
    with the trade (what was applied), not today's registry, and it is a second reading of
    the rules. A row touched twice (self-trade, fee account = buyer) appears once."""
    moves: list[tuple[RowKey, int, int]] = [
        ((buyer, quote), buyer_refund, -(cost + buyer_refund)),
        ((buyer, base), quantity - buyer_fee, 0),
        ((seller, base), seller_refund, -(quantity + seller_refund)),
        ((seller, quote), cost - seller_fee, 0),
    ]
    if buyer_fee:
        moves.append(((fee_account, base), buyer_fee, 0))
    if seller_fee:
        moves.append(((fee_account, quote), seller_fee, 0))
    merged: dict[RowKey, tuple[int, int]] = {}
    for key, available, frozen in moves:
        a, f = merged.get(key, (0, 0))
        merged[key] = (a + available, f + frozen)
    return merged


def balance_event_move(kind: str, amount: int) -> tuple[int, int]:
    try:
        available_sign, frozen_sign = _BALANCE_EVENT_SIGNS[kind]
    except KeyError:
        raise ValueError(f"balance_events row of unknown kind {kind!r}") from None
    return available_sign * amount, frozen_sign * amount


@dataclass
class Rebuild:
    """Running totals per row: [available, frozen, version]."""

    rows: dict[RowKey, list[int]] = field(default_factory=dict)
    trades: int = 0
    balance_events: int = 0

    def add(self, key: RowKey, available: int, frozen: int) -> None:
        row = self.rows.get(key)
        if row is None:
            self.rows[key] = [available, frozen, 1]
        else:
            row[0] += available
            row[1] += frozen
            row[2] += 1

    def add_trade_row(self, row: tuple[Any, ...]) -> None:
        (buyer, seller, base, quote, quantity, cost, buyer_refund, seller_refund,
         buyer_fee, seller_fee, fee_account) = row
        moves = trade_moves(
            buyer=buyer, seller=seller, base=base, quote=quote, quantity=quantity,
            cost=cost, buyer_refund=buyer_refund or 0, seller_refund=seller_refund or 0,
            buyer_fee=buyer_fee or 0, seller_fee=seller_fee or 0, fee_account=fee_account,
        )
        for key, (available, frozen) in moves.items():
            self.add(key, available, frozen)
        self.trades += 1

    def add_balance_event_row(self, row: tuple[Any, ...]) -> None:
        kind, user_id, asset_id, amount = row
        self.add((user_id, asset_id), *balance_event_move(kind, amount))
        self.balance_events += 1

    def merge(self, other: Rebuild) -> None:
        for key, (available, frozen, version) in other.rows.items():
            row = self.rows.get(key)
            if row is None:
                self.rows[key] = [available, frozen, version]
            else:
                row[0] += available
                row[1] += frozen
                row[2] += version
        self.trades += other.trades
        self.balance_events += other.balance_events

    def figures(self) -> dict[RowKey, Figures]:
        return {key: Figures(*row) for key, row in self.rows.items()}


def compare(stored: dict[RowKey, Figures], rebuilt: dict[RowKey, Figures]) -> list[Difference]:
    """Every row present on one side only, or with different figures, by user and asset."""
    return [
        Difference(key[0], key[1], stored.get(key), rebuilt.get(key))
        for key in sorted(stored.keys() | rebuilt.keys())
        if stored.get(key) != rebuilt.get(key)
    ]


def token_ranges(count: int) -> list[tuple[int, int]]:
    """`count` contiguous (low, high] ranges covering the whole Murmur3 token space."""
    if count < 1:
        raise ValueError("need at least one token range")
    span = TOKEN_MAX - TOKEN_MIN
    bounds = [TOKEN_MIN + span * i // count for i in range(count)] + [TOKEN_MAX]
    return list(itertools.pairwise(bounds))


# -- the scan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scan:
    table: str
    low: int
    high: int


class Verifier:
    """One read-only CQL session over the keyspace; `run()` scans and compares."""

    def __init__(self, cluster: Cluster, session: Session, keyspace: str) -> None:
        self.cluster = cluster
        self.session = session
        # Qualified table names: Cassandra 5 warns about prepared statements under `USE`.
        self.statements: dict[str, PreparedStatement] = {
            table: session.prepare(text.format(keyspace=keyspace))
            for table, text in _CQL.items()
        }

    @classmethod
    async def open(cls, settings: Settings) -> Verifier:
        def connect() -> Verifier:
            cluster = cql.make_cluster(settings)  # rows are plain tuples (cheaper to scan)
            try:
                return cls(cluster, cluster.connect(), settings.keyspace)
            except Exception:
                cluster.shutdown()
                raise

        return await asyncio.to_thread(connect)

    async def close(self) -> None:
        await asyncio.to_thread(self.cluster.shutdown)

    async def run(self, *, ranges: int = DEFAULT_RANGES, parallel: int = DEFAULT_PARALLEL,
                  on_range_done: Callable[[int, int], None] | None = None) -> Report:
        """Scan, rebuild, compare. `on_range_done(ranges_done, rows_scanned)` after each
        token range of each table, for a progress display."""
        started = time.monotonic()
        scans = [_Scan(table, low, high) for low, high in token_ranges(ranges)
                 for table in self.statements]
        rebuilt = Rebuild()
        stored: dict[RowKey, Figures] = {}
        gate = asyncio.Semaphore(parallel)
        done = [0, 0]

        async def one(scan: _Scan) -> None:
            async with gate:
                partial, rows, count = await self._scan_with_retries(scan)
            rebuilt.merge(partial)
            stored.update(rows)
            done[0] += 1
            done[1] += count
            if on_range_done is not None:
                on_range_done(done[0], done[1])

        await _gather_all(one(scan) for scan in scans)
        differences = compare(stored, rebuilt.figures())
        return Report(
            rows_checked=len(stored.keys() | rebuilt.rows.keys()),
            trades=rebuilt.trades,
            balance_events=rebuilt.balance_events,
            differences=differences,
            seconds=time.monotonic() - started,
        )

    async def _scan_with_retries(self, scan: _Scan
                                 ) -> tuple[Rebuild, dict[RowKey, Figures], int]:
        """One token range of one table. A transient failure re-reads the whole range into
        fresh totals, so no row is ever counted twice."""
        delay = 0.5
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return await self._scan(scan)
            except Exception as exc:
                if not cql.is_transient(exc) or attempt == ATTEMPTS:
                    raise
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def _scan(self, scan: _Scan) -> tuple[Rebuild, dict[RowKey, Figures], int]:
        partial = Rebuild()
        stored: dict[RowKey, Figures] = {}
        count = 0
        async for page in _pages(self.session, self.statements[scan.table],
                                 (scan.low, scan.high)):
            count += len(page)
            if scan.table == "trades":
                for row in page:
                    partial.add_trade_row(row)
            elif scan.table == "balance_events":
                for row in page:
                    partial.add_balance_event_row(row)
            else:
                for user_id, asset_id, available, frozen, version in page:
                    stored[(user_id, asset_id)] = Figures(available, frozen, version)
        return partial, stored, count


async def _gather_all(coroutines: Iterable[Any]) -> None:
    """Like gather, but on the first failure the other scans are cancelled, not leaked."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def _pages(session: Session, statement: PreparedStatement, parameters: tuple[Any, ...]
                 ) -> AsyncIterator[list[Any]]:
    """The result pages of one query. The next page is requested before the current one is
    handed out, so the database works while Python counts."""
    loop = asyncio.get_running_loop()
    pages: asyncio.Queue[tuple[list[Any] | None, BaseException | None]] = asyncio.Queue()
    bound = statement.bind(parameters)
    bound.fetch_size = PAGE_ROWS
    response = session.execute_async(bound)

    def on_rows(rows: list[Any]) -> None:
        loop.call_soon_threadsafe(pages.put_nowait, (rows, None))

    def on_error(exc: BaseException) -> None:
        loop.call_soon_threadsafe(pages.put_nowait, (None, exc))

    response.add_callbacks(on_rows, on_error)
    while True:
        rows, exc = await pages.get()
        if exc is not None:
            raise exc
        more = response.has_more_pages
        if more:
            response.start_fetching_next_page()
        yield rows or []
        if not more:
            return


async def verify(settings: Settings, *, ranges: int = DEFAULT_RANGES,
                 parallel: int = DEFAULT_PARALLEL,
                 on_range_done: Callable[[int, int], None] | None = None) -> Report:
    """Library entry point: connect, scan the keyspace of `settings`, compare, disconnect."""
    verifier = await Verifier.open(settings)
    try:
        return await verifier.run(ranges=ranges, parallel=parallel, on_range_done=on_range_done)
    finally:
        await verifier.close()


def scans_for(ranges: int) -> int:
    """How many range scans `run(ranges=...)` makes (for a progress total)."""
    return ranges * len(_CQL)
