"""Benchmark: "all balances of a user" from user_balances (one partition per user) versus the
same rows in a table partitioned by asset (one query per asset the user holds).

Runs against the real Cassandra of `settler dev up`, in a keyspace of its own that it drops
at the end. Prints a markdown table, writes it into the "Balance reads" section of
BENCHMARKS.md and plots benchmarks/read_balances.png. Reproduce:

    .venv/bin/python benchmarks/read_balances.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cassandra.query import PreparedStatement

from settler.config import Settings, load_settings
from settler.store import cql
from settler.store.db import SettlementDb, UserBalance
from settler.store.schema import apply_schema, drop_keyspace

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
PLOT = Path(__file__).with_suffix(".png")
SECTION = "## Balance reads"
REPRODUCE = ".venv/bin/python benchmarks/read_balances.py"

REGISTRY_ASSETS = 100
HOLDINGS = (3, 20, 100)

BY_ASSET_DDL = """
CREATE TABLE IF NOT EXISTS {keyspace}.balances_by_asset (
    asset_id   int,
    user_id    bigint,
    available  bigint,
    frozen     bigint,
    version    bigint,
    updated_at bigint,
    PRIMARY KEY (asset_id, user_id)
)"""
INSERT_BY_USER = (
    "INSERT INTO user_balances (user_id, asset_id, available, frozen, version, updated_at,"
    " applied) VALUES (?, ?, ?, ?, 1, 0, {})"
)
INSERT_BY_ASSET = (
    "INSERT INTO balances_by_asset (asset_id, user_id, available, frozen, version, updated_at)"
    " VALUES (?, ?, ?, ?, 1, 0)"
)
SELECT_BY_ASSET = (
    "SELECT asset_id, available, frozen, version, updated_at FROM balances_by_asset"
    " WHERE asset_id = ? AND user_id = ?"
)

Read = Callable[[int], Awaitable[list[UserBalance]]]


@dataclass(frozen=True)
class Layout:
    name: str
    queries: str  # queries per read, as a formula of k (assets held)


USER_PARTITION = Layout("user partition (user_balances)", "1")
BY_ASSET_CONCURRENT = Layout("asset partition, concurrent", "k")
BY_ASSET_SEQUENTIAL = Layout("asset partition, sequential", "k")
LAYOUTS = (USER_PARTITION, BY_ASSET_CONCURRENT, BY_ASSET_SEQUENTIAL)


@dataclass(frozen=True)
class Result:
    holdings: int
    layout: Layout
    p50_ms: float
    p99_ms: float
    reads_per_s: float
    reads: int


# -- data -------------------------------------------------------------------------------


def user_ids(holdings: int, users: int) -> list[int]:
    return [holdings * 1_000_000 + i for i in range(1, users + 1)]


def holdings_of(user_id: int, holdings: int) -> list[int]:
    """Which asset ids a user holds: a fixed random sample per user, sorted like the rows."""
    return sorted(random.Random(user_id).sample(range(1, REGISTRY_ASSETS + 1), holdings))


async def load(db: SettlementDb, users: int) -> None:
    by_user, by_asset = db.session.prepare(INSERT_BY_USER), db.session.prepare(INSERT_BY_ASSET)
    rows = [
        (user_id, asset_id, random.randrange(10**12), random.randrange(10**10))
        for k in HOLDINGS for user_id in user_ids(k, users) for asset_id in holdings_of(user_id, k)
    ]
    gate = asyncio.Semaphore(128)

    async def write(user_id: int, asset_id: int, available: int, frozen: int) -> None:
        async with gate:
            await db.run(by_user, (user_id, asset_id, available, frozen))
            await db.run(by_asset, (asset_id, user_id, available, frozen))

    started = time.perf_counter()
    await asyncio.gather(*(write(*row) for row in rows))
    progress(f"loaded {len(rows)} rows into each layout in {time.perf_counter() - started:.1f}s")


# -- reads ------------------------------------------------------------------------------


def by_asset_reads(db: SettlementDb, select: PreparedStatement, holdings: int
                   ) -> tuple[Read, Read]:
    async def one(user_id: int, asset_id: int) -> UserBalance | None:
        rows = await db.run(select, (asset_id, user_id))
        first = next(iter(rows), None)
        return None if first is None else UserBalance(user_id, *first)

    async def concurrent(user_id: int) -> list[UserBalance]:
        found = await asyncio.gather(*(one(user_id, a) for a in holdings_of(user_id, holdings)))
        return [row for row in found if row is not None]

    async def sequential(user_id: int) -> list[UserBalance]:
        found = [await one(user_id, a) for a in holdings_of(user_id, holdings)]
        return [row for row in found if row is not None]

    return concurrent, sequential


async def measure(read: Read, users: list[int], requests: int, seconds: float,
                  concurrency: int, label: str) -> tuple[list[float], float]:
    """Up to `requests` reads (or `seconds`, whichever ends first) with `concurrency` in
    flight; returns per-read latencies (ms) and reads/s."""
    latencies: list[float] = []
    issued = 0
    started = time.perf_counter()
    deadline = started + seconds
    report_every = max(1, requests // 4)

    async def worker() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            user_id = users[issued % len(users)]
            issued += 1
            began = time.perf_counter()
            rows = await read(user_id)
            latencies.append((time.perf_counter() - began) * 1000)
            if not rows:
                raise RuntimeError(f"user {user_id} read no rows")
            if len(latencies) % report_every == 0:
                progress(f"  {label}: {len(latencies)}/{requests} reads")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, len(latencies) / (time.perf_counter() - started)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run_cell(read: Read, holdings: int, layout: Layout, users: list[int],
                   args: argparse.Namespace) -> Result:
    label = f"{holdings:>3} assets, {layout.name}"
    await measure(read, users, args.warmup, 2.0, args.concurrency, label + " (warm-up)")
    latencies, rate = await measure(read, users, args.requests, args.cell_seconds,
                                    args.concurrency, label)
    result = Result(holdings, layout, percentile(latencies, 0.50),
                    percentile(latencies, 0.99), rate, len(latencies))
    progress(f"{label}: {result.reads} reads, p50 {result.p50_ms:.2f} ms,"
             f" p99 {result.p99_ms:.2f} ms, {result.reads_per_s:,.0f} reads/s")
    return result


async def benchmark(settings: Settings, args: argparse.Namespace) -> list[Result]:
    db = await SettlementDb.open(settings)
    try:
        await load(db, args.users)
        select = db.session.prepare(SELECT_BY_ASSET)
        results = []
        for holdings in HOLDINGS:
            users = user_ids(holdings, args.users)
            concurrent, sequential = by_asset_reads(db, select, holdings)
            progress(f"reading users holding {holdings} assets")
            reads = {USER_PARTITION: db.get_user_all_balances,
                     BY_ASSET_CONCURRENT: concurrent, BY_ASSET_SEQUENTIAL: sequential}
            for layout in LAYOUTS:
                results.append(await run_cell(reads[layout], holdings, layout, users, args))
        return results
    finally:
        await db.close()


# -- output -----------------------------------------------------------------------------


def markdown_table(results: list[Result]) -> str:
    baseline = {r.holdings: r for r in results if r.layout is USER_PARTITION}
    lines = [
        "| assets held (k) | layout | queries per read | reads measured | p50 ms | p99 ms "
        "| reads/s | p50 vs user partition | p99 vs user partition |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        base = baseline[r.holdings]
        lines.append(
            f"| {r.holdings} | {r.layout.name} | {r.layout.queries.replace('k', str(r.holdings))}"
            f" | {r.reads} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.reads_per_s:,.0f}"
            f" | {r.p50_ms / base.p50_ms:.1f}x | {r.p99_ms / base.p99_ms:.1f}x |"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for axis, name, value in ((axes[0], "p50", "p50_ms"), (axes[1], "p99", "p99_ms")):
        for layout, marker in zip(LAYOUTS, "osd", strict=True):
            points = [r for r in results if r.layout is layout]
            axis.plot([r.holdings for r in points], [getattr(r, value) for r in points],
                      marker=marker, label=layout.name)
        axis.set(title=f"{name} latency of one \"all balances\" read", xlabel="assets held",
                 xscale="log", yscale="log", xticks=list(HOLDINGS))
        axis.set_xticklabels([str(h) for h in HOLDINGS])
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms (log)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def section(table: str, args: argparse.Namespace, settings: Settings, seconds: float,
            load_before: float) -> str:
    return f"""{SECTION}

"All balances of a user" read from `user_balances` (`PRIMARY KEY (user_id, asset_id)`: one
single-partition query through `SettlementDb.get_user_all_balances`) versus the same rows in
a table partitioned by asset (`PRIMARY KEY (asset_id, user_id)`: one query per asset the user
holds), the per-asset queries issued all at once (`asyncio.gather`, as a real service would)
or one after another. The by-asset reads are told the user's holdings for free; a service
without such an index would have to query every registered asset, i.e. pay the k = 100 row
for every user.

- Data: {args.users} users per holding size k, holdings drawn at random from {REGISTRY_ASSETS}
  asset ids, the same rows in both tables, all in memory.
- Load: {args.concurrency} reads in flight (closed loop); per cell up to {args.requests}
  measured reads or {args.cell_seconds:.0f} s, after up to {args.warmup} warm-up reads.
- Stack: single-node Cassandra 5.0 from `settler dev up` on loopback, consistency
  {settings.cql_consistency}; the Python client shares the {os.cpu_count()}-core machine
  with it (load average {load_before:.1f} at the start). Whole run: {seconds:.0f} s.

With a fixed number of reads in flight on a CPU-bound machine, latency is roughly reads in
flight / throughput, so issuing a read's k queries at once mostly lengthens the queues: it
beats sequential only while there is idle capacity. Either way the cost of the by-asset layout
grows with k, and the single-partition read does not.

Reproduce (with `settler dev up` running):

    {REPRODUCE}

{table}

![read latency by layout](benchmarks/{PLOT.name})
"""


def replace_section(document: str, new_section: str) -> str:
    """Swap this benchmark's section in place; other sections are left exactly as they are."""
    if not document.strip():
        return f"# Benchmarks\n\n{new_section}"
    padded = "\n" + document
    start = padded.find(f"\n{SECTION}\n")
    if start < 0:
        return document.rstrip("\n") + "\n\n" + new_section
    end = padded.find("\n## ", start + 1)
    tail = padded[end + 1:] if end >= 0 else ""
    return padded[1:start + 1] + new_section + ("\n" + tail if tail else "")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--users", type=int, default=200, help="users per holding size")
    parser.add_argument("--requests", type=int, default=2000, help="measured reads per cell")
    parser.add_argument("--cell-seconds", type=float, default=10.0,
                        help="time limit of one cell's measured reads")
    parser.add_argument("--warmup", type=int, default=200,
                        help="unmeasured reads per cell (at most 2 s)")
    parser.add_argument("--concurrency", type=int, default=16, help="reads in flight")
    parser.add_argument("--no-write", action="store_true",
                        help="print the table only; leave BENCHMARKS.md and the PNG alone")
    args = parser.parse_args()
    settings = load_settings(environ={
        **os.environ, "SETTLER_KEYSPACE": f"bench_reads_{secrets.token_hex(4)}",
    })
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    apply_schema(settings)
    try:
        cluster, session = cql.connect(settings)
        try:
            session.execute(BY_ASSET_DDL.format(keyspace=settings.keyspace), timeout=60)
        finally:
            cluster.shutdown()
        results = asyncio.run(benchmark(settings, args))
    finally:
        drop_keyspace(settings)
    table = markdown_table(results)
    print(table)
    if not args.no_write:
        text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""
        ours = section(table, args, settings, time.perf_counter() - started, load_before)
        BENCHMARKS_MD.write_text(replace_section(text, ours))
        plot(results, PLOT)
        progress(f"wrote {BENCHMARKS_MD.name} ({SECTION[3:]}) and {PLOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
