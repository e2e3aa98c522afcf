"""`python -m benchmarks`: settle throughput (worker, ceilings, naive loop, latency), replay
and memory on the running dev stack.

    python -m benchmarks                    # everything (~35 min), writes BENCHMARKS.md
    python -m benchmarks --quick            # smaller sizes, same shape (~5 min)
    python -m benchmarks --only settle      # or replay, or memory
    python -m benchmarks --baseline-rev 4fe555f
                                            # also that revision's worker on the same
                                            # stream, back to back, with the ratio
    python -m benchmarks --worker-rev REV   # the worker runs use the worker of REV
    python -m benchmarks settle --worker-env SETTLER_MAX_IN_FLIGHT=64 \\
                                --worker-env SETTLER_MAX_IN_FLIGHT=512
                                            # worker run only, once per --worker-env group
    python -m benchmarks latency --rate 1900 [--worker-env KEY=VALUE ...]
                                            # latency only, at a steady rate (~1 min)
    python -m benchmarks flame [--worker-rev REV] [--label NAME]
                                            # py-spy flame graph of the trade phase
    python -m benchmarks.ab --a-rev 4fe555f --b-rev HEAD
                                            # interleaved A/B (see benchmarks/ab.py)

Needs `settler dev up` (on SETTLER_KAFKA_BOOTSTRAP / SETTLER_CQL_CONTACT_POINTS when set).
Creates its own topics, consumer groups and keyspaces and removes them at the end. A worker
of a git revision (`--worker-rev`, `--baseline-rev`) runs that revision's `settler/`,
extracted with `git archive`, against keyspaces made with that revision's `schema/`; the
ceilings and the naive loop always use the working tree's Ledger and SettlementDb.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks import memory, report
from benchmarks.ceiling import NativeBuildError, require_tools, run_ceilings
from benchmarks.flame import SAMPLE_HZ, run_flame
from benchmarks.settle import (
    Phases,
    prepare,
    run_latency,
    run_naive,
    run_replay,
    run_worker_phases,
)
from benchmarks.stack import (
    Stack,
    WorkerSource,
    hold_machine,
    machine,
    progress,
    worker_source,
)
from settler.core.registry import Registry, load_registry
from settler.dev import stack as devstack


@dataclass(frozen=True)
class Sizes:
    trades: int
    naive_trades: int  # about 5,000 records with their funding
    latency_s: float
    memory: memory.MemorySizes


FULL = Sizes(200_000, 4_500, 30.0, memory.FULL)
QUICK = Sizes(20_000, 900, 10.0, memory.QUICK)
PARTS = ("settle", "replay", "memory")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", choices=PARTS, help="run one part (default: all three)")
    parser.add_argument("--no-write", action="store_true",
                        help="print and save JSON only: leave BENCHMARKS.md and the PNGs alone")
    parser.add_argument("--baseline-rev", metavar="REV",
                        help="settle part: also run the worker of this git revision over the "
                             "same stream, right after the measured worker, and report the "
                             "ratio (e.g. the last commit before a change)")
    commands = parser.add_subparsers(dest="command", metavar="{settle,latency,flame}")
    variants = commands.add_parser(
        "settle", help="only the worker run (a), once per --worker-env group; prints trades/s",
        description="Produce the settle stream once, then run `settler run` over it once per "
                    "--worker-env group (each in a fresh keyspace and group) and print "
                    "trades/s and CPU per event. Writes benchmarks/results/settle-variants.json "
                    "only.",
    )
    variants.add_argument(
        "--worker-env", action="append", nargs="*", metavar="KEY=VALUE",
        help="SETTLER_* settings of one variant (repeat the flag for more variants; the "
             "SETTLER_ prefix may be left out)",
    )
    variants.add_argument("--trades", type=int, help="trades in the stream (default 200,000)")
    latency = commands.add_parser(
        "latency", help="only the latency run, once per --worker-env group; prints p50/p99",
        description="Produce a fresh stream at a steady rate into a running worker, once per "
                    "--worker-env group, and print produce -> settled p50/p99. Writes "
                    "benchmarks/results/latency-variants.json only.",
    )
    latency.add_argument("--rate", type=float, required=True, help="records/s to produce")
    latency.add_argument("--seconds", type=float, default=30.0,
                         help="how long to produce (default 30)")
    latency.add_argument("--worker-env", action="append", nargs="*", metavar="KEY=VALUE",
                         help="SETTLER_* settings of one variant (repeat for more variants)")
    flame = commands.add_parser(
        "flame", help="py-spy flame graph of the worker during the trade phase",
        description="Produce the settle stream, settle its funding, then settle its trades "
                    "with `py-spy record` attached to the worker from /readyz until caught "
                    "up. Writes benchmarks/flame-<label>.svg.",
    )
    flame.add_argument("--trades", type=int, help="trades in the stream (default 200,000)")
    flame.add_argument("--label", help="the file is benchmarks/flame-LABEL.svg (default: the "
                                       "--worker-rev, else 'worktree')")
    flame.add_argument("--rate", type=int, default=SAMPLE_HZ,
                       help=f"samples per second (default {SAMPLE_HZ}: more distorts the "
                            "worker on 2 cores)")
    # Accepted before and after the subcommand; SUPPRESS keeps it from resetting them.
    for target, quick, rev in ((parser, False, None),
                               (variants, argparse.SUPPRESS, argparse.SUPPRESS),
                               (latency, argparse.SUPPRESS, argparse.SUPPRESS),
                               (flame, argparse.SUPPRESS, argparse.SUPPRESS)):
        target.add_argument("--quick", action="store_true", default=quick,
                            help="smaller sizes (20k trades, memory up to 30k users)")
        target.add_argument("--worker-rev", metavar="REV", default=rev,
                            help="run the worker of this git revision (git archive, its own "
                                 "schema) instead of the working tree")
    return parser.parse_args(argv)


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--worker-env: expected KEY=VALUE, got {pair!r}")
        key = key.upper()
        env[key if key.startswith("SETTLER_") else f"SETTLER_{key}"] = value
    return env


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = "python -m benchmarks" + "".join(f" {shlex.quote(a)}" for a in argv)
    missing = [service for service, pid in devstack.pids().items() if pid is None]
    if missing:
        print(f"{' and '.join(missing)} not running: start the dev stack with "
              "`settler dev up`", file=sys.stderr)
        return 2
    if args.command is None and args.only in (None, "settle"):
        try:
            require_tools()  # now, not after the worker runs
        except NativeBuildError as exc:
            print(exc, file=sys.stderr)
            return 2
    source = worker_source(args.worker_rev)
    baseline = worker_source(args.baseline_rev) if args.baseline_rev else None
    lock = hold_machine()  # noqa: F841 - held until this process exits
    stack = Stack()
    worker = source.describe
    if source.path is None and machine()["dirty"]:
        worker += " with uncommitted changes in `settler/`"
    sizes = QUICK if args.quick else FULL
    try:
        return asyncio.run(_run(args, sizes, stack, command, worker, source, baseline))
    except asyncio.CancelledError:
        progress("interrupted; what the run created is removed")
        return 130
    except NativeBuildError as exc:
        print(exc, file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, sizes: Sizes, stack: Stack, command: str,
               worker: str, source: WorkerSource, baseline: WorkerSource | None) -> int:
    registry = load_registry(stack.base.registry)
    started = time.monotonic()
    # Ctrl-C or SIGTERM: cancel, so every worker subprocess is stopped and everything the
    # run created is removed (also when started in the background, where SIGINT is ignored).
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda: main_task.cancel() if main_task else None)
    try:
        if args.command == "settle":
            await settle_variants(stack, registry, args, sizes, source)
            return 0
        if args.command == "latency":
            await latency_variants(stack, registry, args, source)
            return 0
        if args.command == "flame":
            await flame(stack, registry, args, sizes, source)
            return 0
        parts = [args.only] if args.only else list(PARTS)
        progress(f"benchmarks: {', '.join(parts)} ({'quick' if args.quick else 'full'} sizes);"
                 f" worker: {worker}" + (f"; baseline: {baseline.describe}" if baseline else ""))
        provenance = (f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `{command}` (repo root, "
                      f"`.venv`); worker: {worker}.")
        for name, body in await _settle_and_replay(stack, registry, sizes, parts, command,
                                                   provenance, source, baseline,
                                                   plot=not args.no_write):
            _publish(args, {name: body})
        if "memory" in parts:
            progress("== memory: worker RSS against distinct users")
            result = await memory.run_memory(stack, registry, sizes.memory, source)
            report.save_json("memory", {"result": result, "command": command})
            if not args.no_write:
                report.plot_memory(result)
            _publish(args, {"memory": report.memory_section(result, provenance)})
    finally:
        await stack.cleanup()
    progress(f"done in {(time.monotonic() - started) / 60:.1f} min"
             + ("" if args.no_write else f"; wrote {report.BENCHMARKS_MD.name}"))
    return 0


async def _settle_and_replay(stack: Stack, registry: Registry, sizes: Sizes,
                             parts: Sequence[str], command: str, provenance: str,
                             source: WorkerSource, baseline_source: WorkerSource | None,
                             *, plot: bool) -> list[tuple[str, str]]:
    if "settle" not in parts and "replay" not in parts:
        return []
    progress(f"== settle: producing {sizes.trades:,} trades and their funding")
    inputs = await prepare(stack, registry, sizes.trades)
    progress("== settle (a): the worker, funding topic then trades topic")
    worker, keyspace = await run_worker_phases(stack, inputs, "worker", source=source)
    baseline: Phases | None = None
    if "settle" in parts and baseline_source is not None:
        progress(f"== settle (a'): the baseline worker, {baseline_source.describe}")
        baseline, _ = await run_worker_phases(stack, inputs, "baseline",
                                              source=baseline_source)
    sections: list[tuple[str, str]] = []
    if "replay" in parts:
        progress("== replay: both topics again under a fresh consumer group")
        replay = await run_replay(stack, inputs, keyspace, source)
        report.save_json("replay", {"replay": replay, "first": worker, "command": command})
        sections.append(("replay", report.replay_section(replay, worker, provenance)))
    if "settle" in parts:
        progress("== settle (b): the ceilings, the worker's own batches without the worker")
        ceilings = await run_ceilings(stack, inputs)
        progress(f"== settle (c): the naive loop on a {sizes.naive_trades:,}-trade stream")
        naive = await run_naive(stack, registry, sizes.naive_trades)
        rate = worker.trades.steady_events_per_s / 2
        progress(f"== settle latency: {rate:,.0f} records/s for {sizes.latency_s:.0f}s")
        latency = await run_latency(stack, registry, rate, sizes.latency_s, source=source)
        report.save_json("settle", {
            "stream": inputs.stream.description, "worker": worker, "baseline": baseline,
            "baseline_rev": baseline_source.describe if baseline_source else None,
            "ceilings": ceilings, "naive": naive, "latency": latency, "command": command,
        })
        if plot:
            report.plot_settle(worker, ceilings, naive, baseline)
        sections.insert(0, ("settle", report.settle_section(
            inputs, worker, ceilings, naive, latency, provenance, baseline,
            baseline_source.describe if baseline_source else None)))
    return sections


def _publish(args: argparse.Namespace, sections: dict[str, str]) -> None:
    if args.no_write:
        return
    sections["machine"] = report.machine_section(machine())
    report.write_sections(sections)


def _label(env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items()) or "defaults"


async def settle_variants(stack: Stack, registry: Registry, args: argparse.Namespace,
                          sizes: Sizes, source: WorkerSource) -> None:
    """The worker run (a) once per --worker-env group, over one produced stream."""
    variants = [parse_env(group) for group in (args.worker_env or [[]])]
    trades = args.trades or sizes.trades
    progress(f"== settle variants: {len(variants)} worker run(s) over {trades:,} trades; "
             f"worker: {source.describe}")
    inputs = await prepare(stack, registry, trades)
    results: list[tuple[dict[str, str], Phases]] = []
    for n, env in enumerate(variants):
        progress(f"== variant {n + 1}/{len(variants)}: {_label(env)}")
        phases, _ = await run_worker_phases(stack, inputs, f"variant{n}", env, source)
        results.append((env, phases))
    report.save_json("settle-variants", {
        "stream": inputs.stream.description, "worker": source.describe,
        "variants": [{"env": env, "run": phases} for env, phases in results],
    })
    print(f"\nworker: {source.describe}\n")
    print(report.table(
        ["worker env", "trades/s", "after start-up", "funding events/s", "start-up (s)",
         "CPU worker", "worker CPU µs/event", "CPU Cassandra", "Cassandra CPU µs/event",
         "CPU other"],
        [[_label(env), report.n(t.trades_per_s), report.n(t.steady_events_per_s),
          report.n(phases.funding.events_per_s), f"{t.startup_s:.1f}",
          report.pct(t.cpu["settler"]), report.us(t.cpu_us_per_event),
          report.pct(t.cpu["cassandra"]), report.us(t.db_us_per_event),
          report.pct(t.cpu["other"])]
         for env, phases in results for t in [phases.trades]]))


async def latency_variants(stack: Stack, registry: Registry, args: argparse.Namespace,
                           source: WorkerSource) -> None:
    """The latency run once per --worker-env group, each on a fresh stream and worker."""
    variants = [parse_env(group) for group in (args.worker_env or [[]])]
    results = []
    for n, env in enumerate(variants):
        progress(f"== latency variant {n + 1}/{len(variants)}: {_label(env)}")
        results.append((_label(env), env, await run_latency(
            stack, registry, args.rate, args.seconds, env, source, label=f"latency{n}")))
    report.save_json("latency-variants", {
        "rate": args.rate, "worker": source.describe,
        "variants": [{"env": env, "run": run} for _, env, run in results],
    })
    print(f"\nworker: {source.describe}\n")
    print(report.table(
        ["worker env", "records/s", "settle p50", "settle p99", "batch p50", "batch p99",
         "CPU worker", "CPU Cassandra"],
        [[label, report.n(run.achieved), report.ms(run.settle_p50_s),
          report.ms(run.settle_p99_s), report.ms(run.batch_p50_s), report.ms(run.batch_p99_s),
          report.pct(run.cpu["settler"]), report.pct(run.cpu["cassandra"])]
         for label, _, run in results]))


async def flame(stack: Stack, registry: Registry, args: argparse.Namespace, sizes: Sizes,
                source: WorkerSource) -> None:
    label = args.label or (args.worker_rev if args.worker_rev else "worktree")
    trades = args.trades or sizes.trades
    progress(f"== flame graph: {trades:,} trades; worker: {source.describe}; py-spy at "
             f"{args.rate} Hz")
    phases, path, samples = await run_flame(stack, registry, trades, source, label, args.rate)
    t = phases.trades
    report.save_json(f"flame-{label}", {"worker": source.describe, "run": phases,
                                        "rate_hz": args.rate, "py_spy": samples,
                                        "svg": path})
    print(f"\n{path.relative_to(report.ROOT)}: {source.describe}, {t.trades:,} trades at "
          f"{t.trades_per_s:,.0f} trades/s under py-spy ({args.rate} Hz; "
          f"{samples or 'no sample count'}); worker CPU {report.us(t.cpu_us_per_event)} "
          "per event")


if __name__ == "__main__":
    sys.exit(main())
