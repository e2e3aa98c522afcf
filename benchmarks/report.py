"""BENCHMARKS.md sections, PNG plots and raw JSON of the benchmarks run here.

Each section sits between marker comments (`<!-- settle:start -->` ... `<!-- settle:end -->`)
so a re-run replaces only its own sections; other sections of the file (e.g. "Balance
reads", written by benchmarks/read_balances.py) are left as they are. The "Optimizations"
table is written once and then left to be filled in by hand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.ceiling import Ceilings
from benchmarks.memory import MemoryResult, MemoryRun
from benchmarks.settle import Inputs, Latency, Phases, Throughput
from benchmarks.stack import RESULTS, ROOT

BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SETTLE_PNG = ROOT / "benchmarks" / "settle_throughput.png"
MEMORY_PNG = ROOT / "benchmarks" / "memory.png"
# Our sections, in the order they take in the file (before anyone else's).
ORDER = ("machine", "settle", "replay", "memory", "optimizations", "flame")


# -- the file ------------------------------------------------------------------------------


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_block(document: str, name: str, body: str, *, keep_existing: bool = False) -> str:
    """`document` with the block `name` replaced by `body` (inserted after our preceding
    block, or before the first `## ` section of anyone else when none of ours exists)."""
    start, end = _markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    if start in document and end in document:
        if keep_existing:
            return document
        head, rest = document.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    if not document.strip():
        document = "# Benchmarks\n"
    for previous in reversed(ORDER[: ORDER.index(name)]):
        previous_end = _markers(previous)[1]
        if previous_end in document:
            head, tail = document.split(previous_end, 1)
            return f"{head}{previous_end}\n\n{block}{tail}"
    for following in ORDER[ORDER.index(name) + 1:]:
        following_start = _markers(following)[0]
        if following_start in document:
            head, tail = document.split(following_start, 1)
            return f"{head}{block}\n\n{following_start}{tail}"
    heading = document.find("\n## ")
    if heading < 0:
        return document.rstrip("\n") + f"\n\n{block}\n"
    return f"{document[:heading + 1]}{block}\n\n{document[heading + 1:]}"


def reflow(markdown: str, width: int = 96) -> str:
    """Re-wrap paragraphs and bullet items (text filled in from numbers comes out ragged);
    tables, headings, images and comments stay as they are."""
    blocks = []
    for block in re.split(r"\n\s*\n", markdown.strip()):
        if block.lstrip().startswith(("|", "#", "![", "<!--", "    ")):
            blocks.append(block)
            continue
        items = re.split(r"\n(?=- )", block)
        blocks.append("\n".join(
            textwrap.fill(" ".join(item.split()), width, break_long_words=False,
                          break_on_hyphens=False,
                          subsequent_indent="  " if item.startswith("- ") else "")
            for item in items))
    return "\n\n".join(blocks) + "\n"


def write_sections(sections: dict[str, str]) -> None:
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""
    for name in ORDER:
        if name in sections:
            text = replace_block(text, name, reflow(sections[name]))
    text = replace_block(text, "optimizations", OPTIMIZATIONS, keep_existing=True)
    text = replace_block(text, "flame", FLAME, keep_existing=True)
    BENCHMARKS_MD.write_text(text.rstrip("\n") + "\n")


def save_json(part: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = json.dumps(data, indent=2, default=_jsonable)
    (RESULTS / f"{part}-{stamp}.json").write_text(text)
    latest = RESULTS / f"{part}.json"
    latest.write_text(text)
    return latest


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "as_json"):
        return value.as_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A markdown table; the first `left` columns left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "".join("---|" if i < left else "---:|" for i in range(len(header)))]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# -- numbers -------------------------------------------------------------------------------


def n(value: float) -> str:
    return f"{value:,.0f}"


def pct(value: float) -> str:
    return f"{value:.0f}%"


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    if math.isinf(seconds):
        return "> last bucket"
    return f"{1000 * seconds:,.1f} ms"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def us(microseconds: float) -> str:
    return "n/a" if math.isnan(microseconds) else f"{microseconds:,.0f} µs"


# -- sections ------------------------------------------------------------------------------


def machine_section(info: dict[str, Any]) -> str:
    return f"""## Machine

The sections "Settlement throughput", "Replay" and "Memory" come from `python -m benchmarks`
(each names the exact command, date and worker revision it was measured with) on:

- {info["nproc"]} CPUs (nproc), {info["cpu_model"]}, {info["ram_gib"]} GiB RAM, Linux
  {info["kernel"]}, Python {info["python"]}, no Docker.
- Kafka {info["kafka"]} (KRaft, one broker) and Cassandra {info["cassandra"]} (one node, RF=1)
  of `settler dev up`, on the same machine over loopback: the worker, both JVMs and the
  benchmark harness share the {info["nproc"]} cores, so CPU is the scarce resource everywhere.
- The machine is shared with other work (tests, experiments); every table has a "CPU other"
  column (busy time of the machine not used by the measured process, the JVMs or the
  harness) to show how much of it ran alongside.
"""


def _cpu_cells(run: Throughput) -> list[str]:
    return [pct(run.cpu[key]) for key in ("settler", "cassandra", "kafka", "other")]


def _run_row(name: str, phases: Phases, startup: str) -> list[str]:
    t = phases.trades
    return [name, n(t.trades), f"{t.wall_s:.1f}", f"**{n(t.trades_per_s)}**",
            n(phases.funding.events_per_s), n(phases.events_per_s), startup,
            pct(t.cpu["settler"]), f"**{us(t.cpu_us_per_event)}**", pct(t.cpu["cassandra"]),
            us(t.db_us_per_event), pct(t.cpu["kafka"]), pct(t.cpu["other"])]


RUN_HEADER = ["run", "trades", "wall (s)", "trades/s", "funding events/s",
              "events/s, whole stream", "start-up (s)", "CPU settling process",
              "settling process CPU per event", "CPU Cassandra", "Cassandra CPU per event",
              "CPU Kafka", "CPU other processes"]


WORKER_CPU_TARGET_US = 80  # issue 11: worker CPU per settled event
NATIVE_SHARE_TARGET = 0.70  # issue 11: worker trades/s as a share of the native ceiling's


def settle_section(inputs: Inputs, worker: Phases, ceilings: Ceilings, naive: Phases,
                   latency: Latency | None, provenance: str, baseline: Phases | None = None,
                   baseline_name: str | None = None) -> str:
    stream = inputs.stream
    w, nv = worker.trades, naive.trades
    native, driver = ceilings.native.trades, ceilings.driver.trades
    rows = [_run_row("worker: `settler run`, defaults, end to end", worker,
                     f"{w.startup_s:.1f}")]
    if baseline is not None:
        rows.append(_run_row(f"baseline worker: {baseline_name}, same stream, right after",
                             baseline, f"{baseline.trades.startup_s:.1f}"))
    rows += [
        _run_row(f"native ceiling: the worker's claims + LOGGED batches, Java driver, "
                 f"{native.notes['in_flight']} in flight (the best bound)", ceilings.native,
                 "-"),
        _run_row(f"native ceiling, LOGGED batches only, "
                 f"{ceilings.native_logged.trades.notes['in_flight']} in flight",
                 ceilings.native_logged, "-"),
        _run_row(f"driver ceiling: the same batches, Python driver `execute_concurrent`, "
                 f"{driver.notes['in_flight']} in flight", ceilings.driver, "-"),
        _run_row("naive loop: one record, one claims write, one batch, one commit (subset)",
                 naive, "-"),
    ]
    ratios = [f"worker / native ceiling = {ratio(w.trades_per_s, native.trades_per_s)}",
              f"worker / driver ceiling = {ratio(w.trades_per_s, driver.trades_per_s)}",
              f"worker / naive = {ratio(w.trades_per_s, nv.trades_per_s)}"]
    if baseline is not None:
        ratios.insert(0, f"worker / baseline = "
                         f"{ratio(w.trades_per_s, baseline.trades.trades_per_s)}")
    outcomes = w.notes["outcomes"]
    text = f"""## Settlement throughput

**Stream**: {stream.description}. Deposits and freezes are on a topic of their own and are
settled first, by a worker run of their own (column "funding events/s"); then a fresh
worker process, same group and keyspace, settles the trades topic ({n(stream.trades)}
records, 3 partitions, keyed by symbol): that is the timed trade phase. Kept apart because
across partitions a trade can otherwise be read before the freeze that funds it, and every
such row would be counted and logged as a balance anomaly, which is not the workload.

{table(RUN_HEADER, rows)}

CPU is percent of one core over the timed span (utime+stime from `/proc/PID/stat`; the
settling process is the worker subprocess, the Java program for the native ceiling, or this
harness for the driver ceiling and the naive loop; "other" is the rest of the machine's
busy time from `/proc/stat`). Per event: see "Per-event cost" below.

- {"; ".join(f"**{r}**" for r in ratios)} (trades/s of the trade phase).
- Worker: wall time runs from process start until the group's committed offsets reach the
  end of every partition (polled every 0.1 s), start-up included; start-up alone (process
  start until `/readyz` answers 200: imports, CQL connect, lease, group join) was
  {w.startup_s:.1f} s, so {n(w.steady_events_per_s)} trades/s after it. Outcomes:
  {n(outcomes["settled"])} settled, {n(w.notes["anomalies"])} balance anomalies,
  {n(w.notes["retries"])} retries; batch latency p50 {ms(w.notes["batch_p50_s"])}, p99
  {ms(w.notes["batch_p99_s"])} (`settler_batch_seconds`; a backlog keeps the pipeline full).
- Naive loop: aiokafka consumer, per record `decode` -> load unseen users -> claims of its
  id -> `Ledger.plan` and `seal` -> await its claims batch, then its one LOGGED batch ->
  commit its one offset. Slow, so it runs on a smaller stream of the same shape:
  {n(naive.funding.events)} funding events and {n(nv.trades)} trades.
{_observations(worker, ceilings)}
{native_section(worker, ceilings)}
{cost_section(worker, ceilings, naive, baseline, baseline_name)}"""
    if latency is not None:
        text += latency_section(latency, w)
    text += f"""
![settlement throughput](benchmarks/{SETTLE_PNG.name})

{provenance} Raw numbers in `benchmarks/results/settle.json`, worker logs in
`benchmarks/results/logs/`.
"""
    return text


def native_section(worker: Phases, ceilings: Ceilings) -> str:
    w = worker.trades
    native = ceilings.native.trades
    planned = ceilings.planned
    share = w.trades_per_s / native.trades_per_s if native.trades_per_s else 0.0
    verdict = "met" if share >= NATIVE_SHARE_TARGET else "not met"
    return f"""### The native ceiling

What the database does with the worker's own writes when the client costs almost nothing.
The stream is planned once, offline, into the worker's own groups: records in the order the
worker's fetches bring them (up to {n(planned["fetch_records"])} of one partition at a
time), the real `Ledger.plan` (every user pre-added as empty: the keyspace is fresh), groups
sealed at {planned["batch_events"]} events, at the worker's estimated byte bound
({n(planned["batch_max_bytes"])} bytes, derived from the server as the worker derives it)
or at the end of a fetch ({planned["events_per_group"]:.1f} events per group on average),
and each group's UNLOGGED claims batch and ONE LOGGED batch built by the real
`SettlementDb` ({planned["plan_us_per_event"]:.0f} µs per event in Python, not timed). A
small Java program (`benchmarks/native/`, the Apache Cassandra Java driver 4.x from Maven
Central, protocol v4, one connection) reads them from a dump holding each value serialized
exactly as the Python driver would send it (every statement carries its own `USING
TIMESTAMP` value), prepares the statements once, and fires the batches with a
bounded number in flight: no Kafka, no decoding, no
reads (the worker's loads of users and claims are not in it). One JVM does every run (an
untimed one first, so that the timed ones find its JIT warm), each run into a fresh keyspace
dropped after it, at several in-flight bounds: the ceiling is the best of them. More in
flight is not always faster: every batch writes the fee account's rows and most carry the
most active users', so many batches at once contend on the same few partitions (in trial
runs on the shared machine 1024 in flight was at times slower than 64-256, at times the
best).

{_native_table(w, ceilings)}

Target of issue 11: the worker at >= {NATIVE_SHARE_TARGET:.0%} of the native ceiling's
trades/s (claims + LOGGED, the same database work as the worker's): {share:.0%}, {verdict}.
Reproduce: `python -m benchmarks --only settle` (Java 17 and Maven on PATH; the program is
built with `mvn package` into `benchmarks/native/target/` on first use).
"""


def _native_table(w: Throughput, ceilings: Ceilings) -> str:
    best = ceilings.native.trades
    rows = []
    for phases in ceilings.native_sweep:
        run = phases.trades
        mark = "**" if run is best else ""
        rows.append([f"claims + LOGGED (the worker's writes), {run.notes['in_flight']} in flight",
                     n(run.notes["batches"]), n(run.notes["batches_per_s"]),
                     f"{mark}{n(run.trades_per_s)}{mark}", pct(run.cpu["settler"]),
                     pct(run.cpu["cassandra"]), us(run.db_us_per_event),
                     f"{mark}{ratio(w.trades_per_s, run.trades_per_s)}{mark}"])
    logged, driver = ceilings.native_logged.trades, ceilings.driver.trades
    rows.append([f"LOGGED batches only, {logged.notes['in_flight']} in flight",
                 n(logged.notes["batches"]), n(logged.notes["batches_per_s"]),
                 n(logged.trades_per_s), pct(logged.cpu["settler"]),
                 pct(logged.cpu["cassandra"]), us(logged.db_us_per_event),
                 ratio(w.trades_per_s, logged.trades_per_s)])
    rows.append([f"claims + LOGGED, Python driver, {driver.notes['in_flight']} in flight",
                 n(driver.notes["batches"]), n(driver.notes["batches"] / driver.wall_s),
                 n(driver.trades_per_s), f"({pct(driver.cpu['settler'])} Python)",
                 pct(driver.cpu["cassandra"]), us(driver.db_us_per_event),
                 ratio(w.trades_per_s, driver.trades_per_s)])
    return table(["run", "batches", "batches/s", "trades/s", "CPU client", "CPU Cassandra",
                  "Cassandra CPU per event", "worker / it"], rows)


def cost_section(worker: Phases, ceilings: Ceilings, naive: Phases, baseline: Phases | None,
                 baseline_name: str | None) -> str:
    w = worker.trades
    runs: list[tuple[str, Throughput]] = [("worker", w)]
    if baseline is not None:
        runs.append((f"baseline worker ({baseline_name})", baseline.trades))
    runs += [(f"native ceiling (Java process, {ceilings.native.trades.notes['in_flight']} "
              "in flight)", ceilings.native.trades),
             ("driver ceiling (Python process)", ceilings.driver.trades),
             ("naive loop (Python process)", naive.trades)]
    rows = [[name, n(run.trades_per_s), f"**{us(run.cpu_us_per_event)}**",
             us(run.db_us_per_event), pct(run.cpu["settler"]), pct(run.cpu["cassandra"])]
            for name, run in runs]
    verdict = "met" if w.cpu_us_per_event <= WORKER_CPU_TARGET_US else "not met"
    against = ""
    if baseline is not None:
        against = (f" The baseline worker spent {us(baseline.trades.cpu_us_per_event)} per "
                   f"event on the same stream, right after: the worker spends "
                   f"{ratio(w.cpu_us_per_event, baseline.trades.cpu_us_per_event)} of that.")
    return f"""### Per-event cost

CPU time (utime+stime of the process from `/proc/PID/stat`) per settled event of the trade
phase. The worker's is counted from the moment it answers `/readyz` (imports, connecting
and joining the group are not a per-event cost) to the moment its committed offsets reach
the end; Cassandra's over the whole timed span of each run.

{table(["run", "trades/s", "settling process CPU per event", "Cassandra CPU per event",
        "CPU settling process", "CPU Cassandra"], rows)}

Target of issue 11: worker CPU per event <= {WORKER_CPU_TARGET_US} µs:
{us(w.cpu_us_per_event)}, {verdict}.{against} Reproduce: `python -m benchmarks --only settle`
(this table), `python -m benchmarks settle --worker-env ...` (per setting), `python -m
benchmarks.ab --a-rev REV --b-rev HEAD` (interleaved A/B of two revisions or settings).
"""


def _observations(worker: Phases, ceilings: Ceilings) -> str:
    """What the CPU split says, in words (fixed thresholds, not judgement calls)."""
    w, c = worker.trades, ceilings.driver.trades
    cores = os.cpu_count() or 1
    busy = w.cpu["machine"] / cores
    own, db = w.cpu["settler"], w.cpu["cassandra"]
    if own >= 85:
        first = (f"the worker process ran at {pct(own)} of one core for the whole trade "
                 "phase: it is CPU-bound in Python (one interpreter, the driver's I/O thread "
                 f"included, shares one GIL), while Cassandra used {pct(db)}")
    elif busy >= 85:
        first = (f"the machine's {cores} cores were {pct(busy)} busy during the trade phase: "
                 f"the worker ({pct(own)} of a core) and Cassandra ({pct(db)}) compete for "
                 "them, so the stack as a whole is CPU-bound, though neither process alone is")
    else:
        first = (f"the worker process used {pct(own)} of one core and Cassandra {pct(db)}, "
                 f"the machine {pct(busy)} of its {cores} cores: none saturates, so the "
                 "pipeline waits on round trips (in-flight depth) part of the time")
    lines = [f"Bottleneck: {first}."]
    early, late = quarter_rates(w)
    if early and late:
        trend = " (the worker slows down as the run goes on)" if late < 0.85 * early else ""
        lines.append(f"Pace within the trade phase, from committed offsets: {n(early)} trades/s "
                     f"in its first quarter after start-up, {n(late)} in its last{trend}.")
    if c.cpu["settler"] >= 75:
        lines.append(f"The driver ceiling is the Python driver's own limit as much as "
                     f"Cassandra's: its process ran at {pct(c.cpu['settler'])} of a core "
                     f"(statement encoding and callbacks) with Cassandra at "
                     f"{pct(c.cpu['cassandra'])}.")
    for run in (w, ceilings.native.trades, c):
        if run.cpu["other"] >= 15:
            names = "; ".join(f"`{cmd}` {pct(used)}"
                              for cmd, used in run.notes.get("other_processes", []))
            lines.append(f"Other processes on the machine (not the settling process, the JVMs "
                         f"or this harness) took {pct(run.cpu['other'])} of a core during the "
                         f"{run.name} run" + (f" ({names})" if names else "") +
                         ": its numbers may be lower than on a quiet machine.")
    return "".join(f"- {line}\n" for line in lines)


def quarter_rates(run: Throughput) -> tuple[float, float]:
    """Committed records/s over the first and the last quarter of a run after start-up."""
    timeline: list[tuple[float, int]] = [
        (t, done) for t, done in run.notes.get("timeline", []) if t >= run.startup_s]
    if len(timeline) < 8:
        return 0.0, 0.0
    span = timeline[-1][0] - timeline[0][0]

    def rate(start: float, end: float) -> float:
        inside = [(t, done) for t, done in timeline if start <= t <= end]
        if len(inside) < 2 or inside[-1][0] == inside[0][0]:
            return 0.0
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    first = timeline[0][0]
    return rate(first, first + span / 4), rate(first + 3 * span / 4, timeline[-1][0])


def latency_section(latency: Latency, worker: Throughput) -> str:
    latency_table = table(
        ["records/s", "observations", "settle p50", "settle p99", "batch p50", "batch p99",
         "CPU worker", "CPU Cassandra", "CPU Kafka"],
        [[n(latency.achieved), n(latency.count), f"**{ms(latency.settle_p50_s)}**",
          f"**{ms(latency.settle_p99_s)}**", ms(latency.batch_p50_s), ms(latency.batch_p99_s),
          pct(latency.cpu["settler"]), pct(latency.cpu["cassandra"]),
          pct(latency.cpu["kafka"])]], left=0)
    return f"""
### Latency: produce -> settled at half the worker's rate

A running worker on a fresh topic and keyspace; a fresh stream of the same shape
({n(latency.events)} records: funding, then {n(latency.trades)} trades) produced at a steady
{n(latency.rate)} records/s (half the {n(worker.steady_events_per_s)} trades/s the worker
reached after start-up above; achieved {n(latency.achieved)}/s, producer `linger_ms=5`) for
{latency.duration_s:.0f} s. Read off the worker's own histograms at the end:
`settler_settle_latency_seconds` (Kafka record timestamp, set by the producer, to batch
durable) and `settler_batch_seconds`. Quantiles interpolate linearly inside the bucket
they fall in (as PromQL `histogram_quantile`), so they are only as fine as the buckets
(..., 10, 20, 30, 50, 75, 100, 150, 200, 300, 500 ms, ...).

{latency_table}

CPU here includes this harness producing ({pct(latency.cpu["bench"])} of a core) on the same
machine. Balance anomalies during this run: {n(latency.anomalies)} (funding and trades share
one topic here, produced in order at a live pace).
"""


def replay_section(replay: Throughput, first: Phases, provenance: str) -> str:
    outcomes = replay.notes["outcomes"]
    replay_table = table(
        ["events", "wall (s)", "events/s", "first settle, events/s", "replay / first",
         "start-up (s)", "CPU worker", "CPU Cassandra", "CPU Kafka", "CPU other"],
        [[n(replay.events), f"{replay.wall_s:.1f}", f"**{n(replay.events_per_s)}**",
          n(first.events_per_s), ratio(replay.events_per_s, first.events_per_s),
          f"{replay.startup_s:.1f}", *_cpu_cells(replay)]], left=0)
    return f"""## Replay

The worker again over both topics of the settle run (funding and trades,
{n(replay.events)} records), with a fresh consumer group (`SETTLER_GROUP_ID`) against the
keyspace that run already settled: every record takes the duplicate path (ids loaded per
id bucket with one slice query, no balance write).

{replay_table}

Outcomes: {n(outcomes["duplicate"])} duplicates, {n(outcomes["settled"])} settled (0 expected),
{n(outcomes["conflict"])} conflicts. Wall time from process start to committed offsets at
the end, as for the worker run.

{provenance} Raw numbers in `benchmarks/results/replay.json`.
"""


def memory_section(result: MemoryResult, provenance: str) -> str:
    runs = result.runs
    header = "| distinct users | " + " | ".join(
        f"RSS, {run.config} (cached rows / remembered ids)" for run in runs) + " |"
    lines = [header, "|---:|" + "---:|" * len(runs)]
    for users in result.checkpoints:
        cells = []
        for run in runs:
            sample = run.rss_at(users) if users <= run.stopped_at else None
            cells.append("-" if sample is None else
                         f"**{sample.rss / 2**20:,.0f} MiB** ({n(sample.cache_rows)} / "
                         f"{n(sample.remembered_ids)})")
        lines.append(f"| {n(users)} | " + " | ".join(cells) + " |")
    lines.append("| peak (VmHWM) | " + " | ".join(
        f"{run.peak_rss / 2**20:,.0f} MiB at {n(run.stopped_at)} users" for run in runs) + " |")
    settings = "; ".join(
        f"{run.config}: " + (", ".join(f"`{k}={v}`" for k, v in run.env.items())
                             or "`SETTLER_BALANCE_CACHE_ROWS=200000`, `SETTLER_RECENT_IDS=500000`")
        for run in runs)
    rates = ", ".join(f"{run.config} {n(run.users_per_s)} users/s" for run in runs)
    over = []
    for run in runs:
        bound = int(run.env.get("SETTLER_BALANCE_CACHE_ROWS", "200000"))
        most = max((s.cache_rows for s in run.samples), default=0)
        if most > bound:
            over.append(f"{run.config} {n(most)} > {n(bound)}")
    remarks_text = ("The worker's own `settler_balance_cache_rows` gauge went above its "
                    f"configured bound ({'; '.join(over)}); compare with RSS in the plot."
                    if over else "")
    plateaus = [text for run in runs if (text := _plateau(run))]
    if plateaus:
        remarks_text += ("\n\nOnce both caches are at their bounds, RSS grows little more: "
                         + "; ".join(plateaus) + ".")
    return f"""## Memory

Worker RSS (`VmRSS` from `/proc/PID/status`) against distinct users seen: one stream of
one deposit per user (3 partitions), settled by a fresh worker per configuration ({settings}).
RSS is sampled every second together with the worker's settled count and its
`settler_balance_cache_rows` / `settler_remembered_ids` gauges, and read off where the
settled count first passes each checkpoint. Budget: {result.note}.

{chr(10).join(lines)}

Every new user costs one partition read (its rows) and one LOGGED batch, so this stream
runs slower than trades ({rates}). {remarks_text}

![memory](benchmarks/{MEMORY_PNG.name})

{provenance} Raw samples in `benchmarks/results/memory.json`.
"""


def _plateau(run: MemoryRun) -> str:
    """From the first sample with both caches at their bounds to the end of the run, how
    much RSS still grew (empty if the run never filled them)."""
    rows = int(run.env.get("SETTLER_BALANCE_CACHE_ROWS", "200000"))
    ids = int(run.env.get("SETTLER_RECENT_IDS", "500000"))
    full = next((s for s in run.samples if s.cache_rows >= rows and s.remembered_ids >= ids),
                None)
    last = run.samples[-1] if run.samples else None
    if full is None or last is None or last.users <= full.users:
        return ""
    return (f"{run.config} {full.rss / 2**20:,.0f} MiB at {n(full.users)} users (both bounds "
            f"reached), {last.rss / 2**20:,.0f} MiB at {n(last.users)} "
            f"({(last.rss - full.rss) / 2**20:+,.0f} MiB)")


OPTIMIZATIONS = """## Optimizations

Before/after on the settle benchmark's timed trade phase (`python -m benchmarks settle
--worker-env KEY=VALUE ...`, or `--worker-rev REV` for the worker of another commit).
Filled in by hand.

""" + table(
    ["change", "setting / commit", "trades/s before", "trades/s after",
     "worker CPU before -> after", "Cassandra CPU before -> after", "notes"],
    [[name, "", "", "", "", "", ""] for name in (
        "coalescing hot rows", "pipelining depth (`SETTLER_MAX_IN_FLIGHT`)",
        "decoding whole fetch batches", "token-aware routing", "uvloop",
        "py-spy top of profile")],
    left=2) + "\n"


FLAME = """## Flame graphs

Where the worker's CPU goes during the settle benchmark's trade phase: `py-spy record`
attached to `settler run` from the moment it answers `/readyz` until its committed offsets
reach the end of the trade topic, sampling at 100 Hz (on this 2-core machine the worker,
both JVMs and py-spy share the cores; py-spy briefly stops the process for each sample, so
a higher rate would slow the worker it measures). Open the SVGs in a browser: they are
interactive (click to zoom, Ctrl-F to search).

- Before (commit 4fe555f, the last before the writer redesign):
  [benchmarks/flame-before.svg](benchmarks/flame-before.svg), to be measured.
- After (the working tree): [benchmarks/flame-after.svg](benchmarks/flame-after.svg), to be
  measured.

Reproduce (200,000 trades each, or `--trades N`):

    python -m benchmarks flame --worker-rev 4fe555f --label before
    python -m benchmarks flame --label after
"""


# -- plots ---------------------------------------------------------------------------------


def plot_settle(worker: Phases, ceilings: Ceilings, naive: Phases,
                baseline: Phases | None = None, path: Path = SETTLE_PNG) -> None:
    runs = [("worker", worker.trades)]
    if baseline is not None:
        runs.append(("baseline", baseline.trades))
    runs += [("native\nceiling", ceilings.native.trades),
             ("native\nLOGGED only", ceilings.native_logged.trades),
             ("driver\nceiling", ceilings.driver.trades), ("naive", naive.trades)]
    colors = {"worker": "#3b75af", "baseline": "#9bbbd9", "naive": "#c44e52"}
    fig, (rate_ax, cpu_ax, pace_ax) = plt.subplots(1, 3, figsize=(17, 4.6))
    names = [name for name, _ in runs]
    rates = [run.trades_per_s for _, run in runs]
    bars = rate_ax.bar(names, rates, color=[colors.get(name, "#888888") for name in names])
    rate_ax.bar_label(bars, labels=[n(r) for r in rates])
    rate_ax.set_ylabel("trades/s (trade phase)")
    rate_ax.set_title("Settlement throughput")
    bottom = [0.0] * len(runs)
    parts = [("settler", "settling process"), ("cassandra", "Cassandra"), ("kafka", "Kafka"),
             ("other", "other")]
    for key, label in parts:
        values = [run.cpu[key] for _, run in runs]
        cpu_ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    cpu_ax.axhline(200, color="black", linewidth=0.8, linestyle="--")
    cpu_ax.set_ylabel("CPU, % of one core (2 cores = 200%)")
    cpu_ax.set_title("Who used the CPU")
    cpu_ax.set_ylim(0, 260)
    cpu_ax.legend(fontsize=8, ncol=2, loc="upper left")
    timeline = worker.trades.notes.get("timeline", [])
    step = 5  # seconds per point: commits land every 500 ms, so 1 s points are jagged
    points = [(t1, (d1 - d0) / (t1 - t0)) for (t0, d0), (t1, d1)
              in zip(timeline[::step], timeline[step::step], strict=False) if t1 > t0]
    pace_ax.plot([t for t, _ in points], [r for _, r in points], color="#3b75af")
    pace_ax.axhline(ceilings.native.trades.trades_per_s, color="#888888", linestyle="--",
                    label="native ceiling (mean)")
    pace_ax.set_ylim(bottom=0)
    pace_ax.set_xlim(left=0)
    pace_ax.set_xlabel("seconds since worker start")
    pace_ax.set_ylabel(f"trades/s committed ({step} s windows)")
    pace_ax.set_title("Worker pace during the trade phase")
    pace_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(result: MemoryResult, path: Path = MEMORY_PNG) -> None:
    fig, (rss_ax, rows_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in result.runs:
        xs = [s.users for s in run.samples]
        rss_ax.plot(xs, [s.rss / 2**20 for s in run.samples], label=run.config)
        rows_ax.plot(xs, [s.cache_rows for s in run.samples], label=f"cached rows, {run.config}")
        rows_ax.plot(xs, [s.remembered_ids for s in run.samples], linestyle="--",
                     label=f"remembered ids, {run.config}")
    for ax in (rss_ax, rows_ax):
        for users in _reached(result):
            ax.axvline(users, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xlabel("distinct users settled")
        ax.set_ylim(bottom=0)
    rss_ax.set_ylabel("worker RSS (MiB)")
    rss_ax.set_title("Worker RSS against distinct users")
    rss_ax.legend()
    rows_ax.set_title("Worker caches (its own gauges)")
    rows_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reached(result: MemoryResult) -> Sequence[int]:
    most = max((run.stopped_at for run in result.runs), default=0)
    return [users for users in result.checkpoints if users <= most]
