"""Token-aware routing versus plain round robin, on the dev stack's one node.

    .venv/bin/python -m benchmarks.routing        # needs `settler dev up`; ~2 min

On one node every replica is the coordinator, so token awareness cannot save a network
hop here; what it can cost is client CPU (the routing key and token of every statement).
The same batches as the driver ceiling (the worker's groups of 10,000 trades and their
funding: per group its claims batch and its LOGGED batch) are executed with the driver's
`execute_concurrent` at 512 in flight, into a fresh keyspace per run, alternating the two
policies (A B A B) in one invocation. Reported: batches/s and this process's CPU time per
batch (driver encoding, routing, I/O thread).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks.settle import (
    CEILING_IN_FLIGHT,
    _execute_all,
    open_store,
    plan_inputs,
    prepare,
)
from benchmarks.stack import Stack, hold_machine, progress
from settler.core.registry import load_registry
from settler.store import cql

TRADES = 10_000
ROUNDS = 2


async def run_one(stack: Stack, inputs: Any, token_aware: bool, n: int) -> tuple[float, float]:
    keyspace = await stack.keyspace(f"routing{n}")
    settings = stack.settings(keyspace)
    original = getattr(cql, "TokenAwarePolicy")  # noqa: B009 - patched below
    if not token_aware:
        # make_cluster wraps its policy in TokenAwarePolicy; here it gets the child alone.
        setattr(cql, "TokenAwarePolicy", lambda child: child)  # noqa: B010
    try:
        store = await open_store(settings)
    finally:
        setattr(cql, "TokenAwarePolicy", original)  # noqa: B010
    try:
        profile = store.session.cluster.profile_manager.default
        policy = type(profile.load_balancing_policy).__name__
        planned = await plan_inputs(store, settings, inputs)
        batches = [batch for groups in planned.phases.values() for group in groups
                   for batch in (group.claims, group.settlement)]
        cpu, wall = time.process_time(), time.perf_counter()
        landed = await asyncio.to_thread(_execute_all, store, batches, CEILING_IN_FLIGHT)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        assert landed == len(batches)
    finally:
        await store.close()
    progress(f"  {policy}: {landed / wall:,.0f} batches/s, {1e6 * cpu / landed:.0f} µs CPU "
             "per batch")
    return landed / wall, 1e6 * cpu / landed


async def main() -> None:
    stack = Stack()
    try:
        registry = load_registry(stack.base.registry)
        inputs = await prepare(stack, registry, TRADES, "routing")
        results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for n in range(ROUNDS * 2):
            token_aware = n % 2 == 0
            results[token_aware].append(await run_one(stack, inputs, token_aware, n))
    finally:
        await stack.cleanup()
    base_rate = max(r for r, _ in results[False])
    base_cpu = min(c for _, c in results[False])
    print(f"\n{inputs.stream.events:,} events per run, {CEILING_IN_FLIGHT} in flight; "
          f"best of {ROUNDS} runs per policy\n")
    print("| policy | batches/s | client CPU per batch | rate vs round robin | "
          "CPU vs round robin |")
    print("|---|---:|---:|---:|---:|")
    for token_aware, name in ((False, "round robin"), (True, "token-aware (default)")):
        rate = max(r for r, _ in results[token_aware])
        cpu = min(c for _, c in results[token_aware])
        print(f"| {name} | {rate:,.0f} | {cpu:.0f} µs | {rate / base_rate:.2f}x | "
              f"{cpu / base_cpu:.2f}x |")


if __name__ == "__main__":
    lock = hold_machine()
    asyncio.run(main())
