"""A/B of two workers, interleaved in one invocation (A B A B ...), so that the ratios come
from runs that shared the machine's state: two git revisions, two settings, or both.

    python -m benchmarks.ab --events 60000 --a-rev 4fe555f --b-rev HEAD --rounds 2
    python -m benchmarks.ab --a-env SETTLER_BATCH_EVENTS=32 --b-env SETTLER_BATCH_EVENTS=64
    python -m benchmarks.ab --a-rev HEAD            # B: the working tree as it is

The stream is the settle benchmark's (benchmarks/stream.py) with `--events` trades; it is
produced once. Each run is a fresh worker process in a fresh keyspace (made with its
revision's own schema) and consumer group: it settles the funding topic, then the timed
trade phase. Reported per run and per side: events/s of the trade phase, worker CPU µs per
event (utime+stime from /readyz to the end, over the events settled meanwhile), Cassandra
CPU (percent of a core, and µs per event), and the B/A ratios of the sides' means. The
numbers of BENCHMARKS.md "Optimizations".
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shlex
import signal
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from benchmarks import report
from benchmarks.settle import Throughput, prepare, run_worker_phases
from benchmarks.stack import Stack, WorkerSource, hold_machine, progress, worker_source
from settler.core.registry import load_registry
from settler.dev import stack as devstack


@dataclass
class Side:
    name: str  # "A" or "B"
    source: WorkerSource
    env: dict[str, str]
    runs: list[Throughput] = field(default_factory=list)

    @property
    def label(self) -> str:
        settings = " ".join(f"{k}={v}" for k, v in self.env.items())
        rev = self.source.label if self.source.path is None else (
            f"{self.source.label} ({self.source.commit})")
        return f"{rev}{', ' + settings if settings else ''}"

    def mean(self, value: Callable[[Throughput], float]) -> float:
        values = [value(run) for run in self.runs if not math.isnan(value(run))]
        return statistics.fmean(values) if values else math.nan

    def spread(self, value: Callable[[Throughput], float], fmt: Callable[[float], str]) -> str:
        values = [value(run) for run in self.runs]
        if len(values) < 2:
            return ""
        return f" ({fmt(min(values))}-{fmt(max(values))})"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ab", description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=60_000,
                        help="trades in the timed phase (default 60,000; its funding is "
                             "settled first, untimed)")
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs (default 2)")
    for side in ("a", "b"):
        parser.add_argument(f"--{side}-rev", metavar="REV",
                            help=f"git revision of {side.upper()}'s worker (default: the "
                                 "working tree)")
        parser.add_argument(f"--{side}-env", action="append", default=[], metavar="KEY=VALUE",
                            help=f"a SETTLER_* setting of {side.upper()} (repeatable; the "
                                 "SETTLER_ prefix may be left out)")
    args = parser.parse_args(argv)
    if args.events < 1 or args.rounds < 1:
        parser.error("--events and --rounds must be at least 1")
    if args.a_rev == args.b_rev and args.a_env == args.b_env:
        parser.error("A and B are the same worker: give --a-rev/--b-rev or --a-env/--b-env")
    return args


def parse_env(pairs: Sequence[str], flag: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag}: expected KEY=VALUE, got {pair!r}")
        key = key.upper()
        env[key if key.startswith("SETTLER_") else f"SETTLER_{key}"] = value
    return env


async def run(args: argparse.Namespace, sides: list[Side], command: str) -> None:
    stack = Stack()
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda: main_task.cancel() if main_task else None)
    try:
        registry = load_registry(stack.base.registry)
        for side in sides:
            progress(f"{side.name}: {side.label}")
        inputs = await prepare(stack, registry, args.events, label="ab")
        for round_no in range(args.rounds):
            for side in sides:
                progress(f"== round {round_no + 1}/{args.rounds}, {side.name}: {side.label}")
                phases, _ = await run_worker_phases(
                    stack, inputs, f"ab{side.name.lower()}{round_no}", side.env, side.source)
                side.runs.append(phases.trades)
                await stack.drop_keyspaces()
    finally:
        await stack.cleanup()
    report.save_json("ab", {
        "command": command, "stream": inputs.stream.description,
        "sides": [{"name": side.name, "worker": side.source.describe, "env": side.env,
                   "runs": side.runs} for side in sides],
    })
    print_table(args, sides, inputs.stream.description)


def print_table(args: argparse.Namespace, sides: list[Side], stream: str) -> None:
    a, b = sides
    print(f"\nStream: {stream}. Trade phase timed; {args.rounds} round(s), interleaved "
          f"{' '.join(['A B'] * args.rounds)}.\n")
    rows = []
    for round_no in range(args.rounds):
        for side in sides:
            run = side.runs[round_no]
            rows.append([f"{side.name}{round_no + 1}", side.label, report.n(run.events_per_s),
                         report.us(run.cpu_us_per_event), report.pct(run.cpu["settler"]),
                         report.pct(run.cpu["cassandra"]), report.us(run.db_us_per_event),
                         report.pct(run.cpu["other"])])
    print(report.table(["run", "worker", "events/s", "worker CPU per event", "CPU worker",
                        "CPU Cassandra", "Cassandra CPU per event", "CPU other"], rows, left=2))

    def rate(run: Throughput) -> float:
        return run.events_per_s

    def cpu(run: Throughput) -> float:
        return run.cpu_us_per_event

    def db(run: Throughput) -> float:
        return run.cpu["cassandra"]

    def db_us(run: Throughput) -> float:
        return run.db_us_per_event

    summary = [[side.name, side.label,
                report.n(side.mean(rate)) + side.spread(rate, report.n),
                report.us(side.mean(cpu)) + side.spread(cpu, report.us),
                report.pct(side.mean(db)) + side.spread(db, report.pct),
                report.us(side.mean(db_us)) + side.spread(db_us, report.us)]
               for side in sides]
    summary.append(["B/A", "", report.ratio(b.mean(rate), a.mean(rate)),
                    report.ratio(b.mean(cpu), a.mean(cpu)), report.ratio(b.mean(db), a.mean(db)),
                    report.ratio(b.mean(db_us), a.mean(db_us))])
    print("\nMeans (min-max over rounds):\n")
    print(report.table(["side", "worker", "events/s", "worker CPU per event", "CPU Cassandra",
                        "Cassandra CPU per event"], summary, left=2))
    print("\nThe machine is shared: compare the sides of this table, not numbers across runs "
          "of other invocations.")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    missing = [service for service, pid in devstack.pids().items() if pid is None]
    if missing:
        print(f"{' and '.join(missing)} not running: start the dev stack with "
              "`settler dev up`", file=sys.stderr)
        return 2
    sides = [Side("A", worker_source(args.a_rev), parse_env(args.a_env, "--a-env")),
             Side("B", worker_source(args.b_rev), parse_env(args.b_env, "--b-env"))]
    command = "python -m benchmarks.ab" + "".join(f" {shlex.quote(a)}" for a in argv)
    lock = hold_machine()  # noqa: F841 - held until this process exits
    try:
        asyncio.run(run(args, sides, command))
    except asyncio.CancelledError:
        progress("interrupted; what the run created is removed")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
