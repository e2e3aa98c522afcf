"""The ceilings of the settle benchmark: the worker's own batches (benchmarks/plan.py) fired
without the worker, by the Python driver from memory and by a native Java program
(benchmarks/native/, the Apache Cassandra Java driver 4.x) at unbounded concurrency.

The native program reads a dump: per group its batches as (statement index, serialized
values), the exact bytes the Python driver would send (each statement carries its own USING
TIMESTAMP value), then the statement texts once, with the keyspace left for the program to
fill in (one dump serves several keyspaces). Maven builds it at benchmark time into
benchmarks/native/target/ (never committed); a missing JDK or Maven is a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cassandra.query import UNSET_VALUE, BatchStatement, BatchType

from benchmarks.plan import Planned
from benchmarks.settle import (
    CEILING_IN_FLIGHT,
    Inputs,
    Phases,
    Throughput,
    execute_planned,
    open_store,
    plan_inputs,
)
from benchmarks.stack import ROOT, CpuMeter, Stack, cpu_seconds, progress
from settler.store import cql
from settler.worker.ports import ProductionStore

NATIVE = ROOT / "benchmarks" / "native"
# The native ceiling is the best of these: more in flight is not always faster
# (see run_ceilings).
NATIVE_IN_FLIGHT = (16, 64, 256, 1024)
WARMUP_IN_FLIGHT = 64  # the untimed first run, so that the timed ones find the JIT warm
MAGIC = b"SETTLERCEIL1"
_LOGGED, _UNLOGGED = 0, 1
_NULL, _UNSET = -1, -2
KEYSPACE_MARK = "{keyspace}."  # replaced by the program's --keyspace
JVM_OPTIONS = ("-Xms128m", "-Xmx768m", "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn")


class NativeBuildError(RuntimeError):
    pass


@dataclass
class Ceilings:
    driver: Phases  # the Python driver's execute_concurrent, claims + LOGGED batches
    # The Java driver, claims + LOGGED batches (the worker's writes), per in-flight bound.
    native_sweep: list[Phases]
    native_logged: Phases  # the Java driver, the LOGGED batches alone, at the best bound
    planned: dict[str, Any]

    @property
    def native(self) -> Phases:
        """The native ceiling: the best trades/s of the sweep."""
        return max(self.native_sweep, key=lambda run: run.trades.trades_per_s)

    def as_json(self) -> dict[str, Any]:
        return {"driver": self.driver, "native": self.native,
                "native_sweep": self.native_sweep, "native_logged": self.native_logged,
                "planned": self.planned}


# -- building the program ------------------------------------------------------------------


def require_tools() -> None:
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        raise NativeBuildError(
            f"the native ceiling needs Java 17 and Maven: {' and '.join(missing)} not on PATH "
            "(the dev stack needs them too)")


def native_classpath() -> str:
    """Compile benchmarks/native/ with Maven when its sources changed; the runtime
    classpath (its classes and the driver's jars from the local Maven repository)."""
    require_tools()
    target = NATIVE / "target"
    classpath_file = target / "classpath.txt"
    stamp = target / "built.stamp"  # Maven leaves an unchanged classpath.txt as it was
    sources = [NATIVE / "pom.xml", *sorted((NATIVE / "src").rglob("*.java"))]
    built = stamp.stat().st_mtime if stamp.exists() and classpath_file.exists() else 0.0
    if any(source.stat().st_mtime > built for source in sources):
        progress("  building the native ceiling (mvn package, benchmarks/native/)")
        result = subprocess.run(
            ["mvn", "-q", "-B", "-Dstyle.color=never", "-f", str(NATIVE / "pom.xml"),
             "package"], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise NativeBuildError(f"mvn package of benchmarks/native failed "
                                   f"(exit {result.returncode}):\n{tail}")
        stamp.touch()
    jars = classpath_file.read_text().strip()
    return os.pathsep.join([str(target / "classes"), jars])


# -- the dump ------------------------------------------------------------------------------


class _Statements:
    """Statement texts by query id, in first-seen order, keyspace-neutral."""

    def __init__(self, store: ProductionStore) -> None:
        self.store = store
        self.keyspace = f"{store.session.keyspace}."
        self.index: dict[bytes, int] = {}
        self.texts: list[str] = []

    def of(self, query_id: bytes) -> int:
        found = self.index.get(query_id)
        if found is None:
            # The driver's registry of prepared statements (the store holds them).
            prepared = self.store.session.cluster._prepared_statements[query_id]
            found = self.index[query_id] = len(self.texts)
            self.texts.append(prepared.query_string.replace(self.keyspace, KEYSPACE_MARK))
        return found


def _batch(batch: BatchStatement, statements: _Statements) -> bytes:
    """One batch: its type and length, then each statement's index and values."""
    parts = [struct.pack(">H", len(batch._statements_and_parameters))]
    for is_prepared, query_id, values in batch._statements_and_parameters:
        assert is_prepared, "the settlement batches hold prepared statements only"
        parts.append(struct.pack(">HH", statements.of(query_id), len(values)))
        for value in values:
            if value is None:
                parts.append(struct.pack(">i", _NULL))
            elif value is UNSET_VALUE:
                parts.append(struct.pack(">i", _UNSET))
            else:
                parts.append(struct.pack(">i", len(value)))
                parts.append(value)
    body = b"".join(parts)
    kind = _LOGGED if batch.batch_type == BatchType.LOGGED else _UNLOGGED
    return struct.pack(">BI", kind, len(body)) + body


def write_dump(planned: Planned, store: ProductionStore, path: Path) -> int:
    """The planned groups of every phase as the native program reads them (written as they
    are encoded; the statement texts, found on the way, come last); bytes written."""
    statements = _Statements(store)
    with path.open("wb") as out:
        out.write(MAGIC)
        out.write(struct.pack(">I", len(planned.phases)))
        for name, groups in planned.phases.items():
            _string(out, name)
            out.write(struct.pack(">I", len(groups)))
            for group in groups:
                out.write(struct.pack(">IIH", group.events, group.trades, 2))
                out.write(_batch(group.claims, statements))
                out.write(_batch(group.settlement, statements))
        out.write(struct.pack(">I", len(statements.texts)))
        for text in statements.texts:
            _string(out, text)
        return out.tell()


def _string(out: BinaryIO, text: str) -> None:
    data = text.encode()
    out.write(struct.pack(">I", len(data)))
    out.write(data)


# -- running it ----------------------------------------------------------------------------


class NativeProgram:
    """The Java program, started once (its JIT warms up across runs) and told one run at a
    time what to fire where; CPU of the Java process, Cassandra and the rest is metered
    between each phase's start and done lines."""

    def __init__(self, stack: Stack, dump: Path, *, datacenter: str, classpath: str) -> None:
        self.stack = stack
        self.dump = dump
        self.datacenter = datacenter
        self.classpath = classpath
        self.proc: asyncio.subprocess.Process | None = None
        self.errors: asyncio.Future[bytes] | None = None

    async def __aenter__(self) -> NativeProgram:
        hosts, port = cql.contact_points(self.stack.base)
        self.proc = await asyncio.create_subprocess_exec(
            "java", *JVM_OPTIONS, "-cp", self.classpath, "settler.bench.NativeCeiling",
            "--dump", str(self.dump), "--host", hosts[0], "--port", str(port),
            "--dc", self.datacenter, "--consistency", self.stack.base.cql_consistency,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        assert self.proc.stderr is not None
        self.errors = asyncio.ensure_future(self.proc.stderr.read())
        await self._expect("ready")
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if exc[0] is None and proc.stdin is not None:
            proc.stdin.write(b"quit\n")
            await proc.stdin.drain()
            proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 30)
        if proc.returncode is None:  # failed, interrupted, or did not quit in time
            proc.kill()
            await proc.wait()

    async def _line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        raw = await self.proc.stdout.readline()
        if not raw:
            code = await self.proc.wait()
            stderr = (await self.errors).decode(errors="replace") if self.errors else ""
            raise RuntimeError(f"the native ceiling exited with {code}; stderr:\n"
                               f"{stderr[-3000:]}")
        return raw.decode().strip()

    async def _expect(self, word: str) -> str:
        line = await self._line()
        if not line.startswith(word):
            raise RuntimeError(f"the native ceiling said {line!r}, expected {word!r}")
        return line

    async def run(self, label: str, keyspace: str, in_flight: int, *,
                  logged_only: bool = False) -> Phases:
        """Every phase of the dump into `keyspace` (its schema applied)."""
        proc = self.proc
        assert proc is not None and proc.stdin is not None
        mode = "logged" if logged_only else "all"
        proc.stdin.write(f"run {label} {keyspace} {in_flight} {mode}\n".encode())
        await proc.stdin.drain()
        runs: dict[str, Throughput] = {}
        while True:
            line = await self._line()
            if line == f"end {label}":
                break
            if not line.startswith("start "):
                raise RuntimeError(f"the native ceiling said {line!r}")
            meter = CpuMeter(proc.pid)
            meter.start()
            cpu_started = cpu_seconds(proc.pid)
            line = await self._expect("done ")
            own = cpu_seconds(proc.pid) - cpu_started
            cpu = meter.stop()
            cpu.pop("wall_s")
            done = json.loads(line[len("done "):])
            events, phase = int(done["events"]), str(done["phase"])
            runs[phase] = Throughput(
                f"{label}-{phase}", events, int(done["trades"]), float(done["elapsed_s"]), cpu,
                cpu_us_per_event=1e6 * own / max(1, events), notes={
                    "in_flight": in_flight, "batches": done["batches"],
                    "groups": done["groups"], "logged_only": logged_only,
                    "batches_per_s": done["batches_per_s"],
                    "other_processes": meter.top_others})
        trades = runs["trades"]
        progress(f"  {label}: {trades.trades_per_s:,.0f} trades/s "
                 f"({trades.notes['batches_per_s']:,.0f} batches/s) over {trades.wall_s:.1f}s;"
                 f" CPU: java {trades.cpu['settler']:.0f}% ({trades.cpu_us_per_event:.0f} "
                 f"µs/event), cassandra {trades.cpu['cassandra']:.0f}% "
                 f"({trades.db_us_per_event:.0f} µs/event), other {trades.cpu['other']:.0f}%")
        return Phases(runs["funding"], trades)


async def run_ceilings(stack: Stack, inputs: Inputs, *,
                       driver_in_flight: int = CEILING_IN_FLIGHT,
                       native_in_flight: Sequence[int] = NATIVE_IN_FLIGHT) -> Ceilings:
    """Plan the stream once into the worker's groups; execute them with the Python driver,
    then with the native program: once untimed to warm up its JIT, then at each in-flight
    bound (all batches), then the LOGGED ones alone at the best bound; each run into a fresh
    keyspace, dropped after it.

    Why a sweep rather than one "unbounded" run: every group's batch writes the fee
    account's rows (and the most active users' rows), so a thousand batches in flight
    contend on the same few partitions; in trial runs on the shared machine 1024 in flight
    was at times slower than 64-256 (once about half), at times the best."""
    classpath = await asyncio.to_thread(native_classpath)
    settings = stack.settings(await stack.keyspace("ceiling"))
    store = await open_store(settings)
    try:
        planned = await plan_inputs(store, settings, inputs)
        progress(f"== settle (b): the Python driver ceiling, {driver_in_flight} in flight")
        driver = await execute_planned(store, planned, driver_in_flight)
        rows = await store.run("SELECT data_center FROM system.local")
        datacenter = str(next(iter(rows))[0])
        with tempfile.TemporaryDirectory(prefix="settler-ceiling-") as tmp:
            dump = Path(tmp) / "batches.bin"
            size = await asyncio.to_thread(write_dump, planned, store, dump)
            progress(f"== settle (b'): the native ceiling (Java driver) at "
                     f"{', '.join(map(str, native_in_flight))} in flight; dump of "
                     f"{planned.groups:,} groups: {size / 2**20:,.1f} MiB")
            async with NativeProgram(stack, dump, datacenter=datacenter,
                                     classpath=classpath) as program:

                async def native(label: str, in_flight: int, logged_only: bool) -> Phases:
                    keyspace = await stack.keyspace(label.replace("-", ""))
                    try:
                        return await program.run(label, keyspace, in_flight,
                                                 logged_only=logged_only)
                    finally:
                        await stack.drop_keyspace(keyspace)

                await native("native-warmup", WARMUP_IN_FLIGHT, False)
                sweep = [await native(f"native-{n}", n, False) for n in native_in_flight]
                best = max(sweep, key=lambda run: run.trades.trades_per_s)
                logged = await native("native-logged", best.trades.notes["in_flight"], True)
    finally:
        await store.close()
    return Ceilings(driver, sweep, logged, planned={
        "groups": planned.groups, "users": planned.users,
        "batch_events": planned.batch_events, "batch_max_bytes": planned.batch_max_bytes,
        "fetch_records": planned.fetch_records,
        "plan_us_per_event": planned.plan_us_per_event,
        "events_per_group": _mean(len_events(planned)),
    })


def len_events(planned: Planned) -> Iterable[int]:
    return (group.events for groups in planned.phases.values() for group in groups)


def _mean(values: Iterable[int]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else 0.0
