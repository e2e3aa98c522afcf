"""`python -m benchmarks`: settle throughput, replay and memory on the running dev stack.

    python -m benchmarks                    # everything (~30 min), writes BENCHMARKS.md
    python -m benchmarks --quick            # smaller sizes, same shape (~2 min)
    python -m benchmarks --only settle      # or replay, or memory
    python -m benchmarks settle --worker-env SETTLER_MAX_IN_FLIGHT=64 \\
                                --worker-env SETTLER_MAX_IN_FLIGHT=512
                                            # worker run only, once per --worker-env group
    python -m benchmarks latency --rate 1900 [--worker-env KEY=VALUE ...]
                                            # latency only, at a steady rate (~1 min)
    python -m benchmarks --worker-rev HEAD  # measure the worker of a git revision

Needs `settler dev up`. Creates its own topics, consumer groups and keyspaces and removes
them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from benchmarks import memory, report
from benchmarks.settle import (
    Phases,
    prepare,
    run_ceiling,
    run_latency,
    run_naive,
    run_replay,
    run_worker_phases,
)
from benchmarks.stack import ROOT, Stack, hold_machine, machine, progress, snapshot
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
SNAPSHOT_ENV = "BENCHMARKS_SETTLER_COMMIT"  # set once re-executed on a --worker-rev snapshot


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", choices=PARTS, help="run one part (default: all three)")
    parser.add_argument("--no-write", action="store_true",
                        help="print and save JSON only: leave BENCHMARKS.md and the PNGs alone")
    commands = parser.add_subparsers(dest="command", metavar="{settle,latency}")
    variants = commands.add_parser(
        "settle", help="only the worker run (a), once per --worker-env group; prints trades/s",
        description="Produce the settle stream once, then run `settler run` over it once per "
                    "--worker-env group (each in a fresh keyspace and group) and print "
                    "trades/s. Writes benchmarks/results/settle-variants.json only.",
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
    # Accepted before and after `settle`; SUPPRESS keeps the subcommand from resetting them.
    for target, quick, rev in ((parser, False, None),
                               (variants, argparse.SUPPRESS, argparse.SUPPRESS),
                               (latency, argparse.SUPPRESS, argparse.SUPPRESS)):
        target.add_argument("--quick", action="store_true", default=quick,
                            help="smaller sizes (20k trades, memory up to 30k users)")
        target.add_argument("--worker-rev", metavar="REV", default=rev,
                            help="run the worker of this git revision (git archive) instead "
                                 "of the working tree")
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
    if args.worker_rev and SNAPSHOT_ENV not in os.environ:
        _reexec_on_snapshot(args.worker_rev, argv)
    lock = hold_machine()  # noqa: F841 - held until this process exits
    stack = Stack()
    if args.worker_rev:
        worker = (f"`{args.worker_rev}` = commit {os.environ[SNAPSHOT_ENV]} (its `settler/` "
                  "extracted with `git archive`, imported by the worker, the ceiling and the "
                  "naive loop alike)")
    else:
        info = machine()
        worker = f"the working tree at commit {info['commit']}" + (
            " with uncommitted changes in `settler/`" if info["dirty"] else "")
    sizes = QUICK if args.quick else FULL
    try:
        return asyncio.run(_run(args, sizes, stack, command, worker))
    except asyncio.CancelledError:
        progress("interrupted; what the run created is removed")
        return 130


def _reexec_on_snapshot(rev: str, argv: Sequence[str]) -> NoReturn:
    """Start again with the `settler` package of `rev` first on the path (and as the
    current directory, which `python -m` puts first): the worker subprocesses inherit it,
    and the ceiling and naive loop use that revision's Ledger and SettlementDb too."""
    source, commit = snapshot(rev)
    env = {**os.environ, SNAPSHOT_ENV: commit,
           "PYTHONPATH": os.pathsep.join([str(source), str(ROOT)]),
           # the running dev stack's pid files, not the snapshot's (empty) .stack/
           devstack.STACK_DIR_ENV: str(devstack.stack_dir())}
    progress(f"measuring the settler of {rev} ({commit}) from {source}")
    os.chdir(source)
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *argv], env)


async def _run(args: argparse.Namespace, sizes: Sizes, stack: Stack, command: str,
               worker: str) -> int:
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
            await settle_variants(stack, registry, args, sizes)
            return 0
        if args.command == "latency":
            await latency_variants(stack, registry, args)
            return 0
        parts = [args.only] if args.only else list(PARTS)
        progress(f"benchmarks: {', '.join(parts)} ({'quick' if args.quick else 'full'} sizes);"
                 f" worker: {worker}")
        provenance = (f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `{command}` (repo root, "
                      f"`.venv`); worker: {worker}.")
        for name, body in await _settle_and_replay(stack, registry, sizes, parts, command,
                                                   provenance):
            _publish(args, {name: body})
        if "memory" in parts:
            progress("== memory: worker RSS against distinct users")
            result = await memory.run_memory(stack, registry, sizes.memory)
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
                             parts: Sequence[str], command: str, provenance: str
                             ) -> list[tuple[str, str]]:
    if "settle" not in parts and "replay" not in parts:
        return []
    progress(f"== settle: producing {sizes.trades:,} trades and their funding")
    inputs = await prepare(stack, registry, sizes.trades)
    progress("== settle (a): the worker, funding topic then trades topic")
    worker, keyspace = await run_worker_phases(stack, inputs, "worker")
    sections: list[tuple[str, str]] = []
    if "replay" in parts:
        progress("== replay: both topics again under a fresh consumer group")
        replay = await run_replay(stack, inputs, keyspace)
        report.save_json("replay", {"replay": replay, "first": worker, "command": command})
        sections.append(("replay", report.replay_section(replay, worker, provenance)))
    if "settle" in parts:
        progress("== settle (b): the ceiling, same batches from memory")
        ceiling = await run_ceiling(stack, inputs)
        progress(f"== settle (c): the naive loop on a {sizes.naive_trades:,}-trade stream")
        naive = await run_naive(stack, registry, sizes.naive_trades)
        rate = worker.trades.steady_events_per_s / 2
        progress(f"== settle latency: {rate:,.0f} records/s for {sizes.latency_s:.0f}s")
        latency = await run_latency(stack, registry, rate, sizes.latency_s)
        report.save_json("settle", {
            "stream": inputs.stream.description, "worker": worker, "ceiling": ceiling,
            "naive": naive, "latency": latency, "command": command,
        })
        report.plot_settle(worker, ceiling, naive)
        sections.insert(0, ("settle", report.settle_section(
            inputs, worker, ceiling, naive, latency, provenance)))
    return sections


def _publish(args: argparse.Namespace, sections: dict[str, str]) -> None:
    if args.no_write:
        return
    sections["machine"] = report.machine_section(machine())
    report.write_sections(sections)


async def settle_variants(stack: Stack, registry: Registry, args: argparse.Namespace,
                          sizes: Sizes) -> None:
    """The worker run (a) once per --worker-env group, over one produced stream."""
    variants = [parse_env(group) for group in (args.worker_env or [[]])]
    trades = args.trades or sizes.trades
    progress(f"== settle variants: {len(variants)} worker run(s) over {trades:,} trades")
    inputs = await prepare(stack, registry, trades)
    results: list[tuple[dict[str, str], Phases]] = []
    for n, env in enumerate(variants):
        label = " ".join(f"{k}={v}" for k, v in env.items()) or "defaults"
        progress(f"== variant {n + 1}/{len(variants)}: {label}")
        phases, _ = await run_worker_phases(stack, inputs, f"variant{n}", env)
        results.append((env, phases))
    report.save_json("settle-variants", {
        "stream": inputs.stream.description,
        "variants": [{"env": env, "run": phases} for env, phases in results],
    })
    print("\n| worker env | trades/s | after start-up | funding events/s | start-up (s) | "
          "CPU worker | CPU Cassandra | CPU other |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for env, phases in results:
        t = phases.trades
        label = " ".join(f"{k}={v}" for k, v in env.items()) or "defaults"
        print(f"| {label} | {t.trades_per_s:,.0f} | {t.steady_events_per_s:,.0f} | "
              f"{phases.funding.events_per_s:,.0f} | "
              f"{t.startup_s:.1f} | {t.cpu['settler']:.0f}% | {t.cpu['cassandra']:.0f}% | "
              f"{t.cpu['other']:.0f}% |")


async def latency_variants(stack: Stack, registry: Registry, args: argparse.Namespace) -> None:
    """The latency run once per --worker-env group, each on a fresh stream and worker."""
    variants = [parse_env(group) for group in (args.worker_env or [[]])]
    results = []
    for n, env in enumerate(variants):
        label = " ".join(f"{k}={v}" for k, v in env.items()) or "defaults"
        progress(f"== latency variant {n + 1}/{len(variants)}: {label}")
        results.append((label, env, await run_latency(stack, registry, args.rate, args.seconds,
                                                      env)))
    report.save_json("latency-variants", {
        "rate": args.rate, "variants": [{"env": env, "run": run} for _, env, run in results],
    })
    print("\n| worker env | records/s | settle p50 | settle p99 | batch p50 | batch p99 | "
          "CPU worker | CPU Cassandra |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, _, run in results:
        print(f"| {label} | {run.achieved:,.0f} | {1000 * run.settle_p50_s:.1f} ms | "
              f"{1000 * run.settle_p99_s:.1f} ms | {1000 * run.batch_p50_s:.1f} ms | "
              f"{1000 * run.batch_p99_s:.1f} ms | {run.cpu['settler']:.0f}% | "
              f"{run.cpu['cassandra']:.0f}% |")


if __name__ == "__main__":
    sys.exit(main())
