"""A/B of worker settings on one mixed stream (deposits, freezes, trades; 2,000 users, Zipf
1.1): produce it to a fresh topic, run `settler run` with extra SETTLER_* settings, report
events/s and CPU of the worker and the JVMs. The numbers of BENCHMARKS.md "Optimizations".

    python -m benchmarks.ab 60000 SETTLER_BATCH_EVENTS=1
    python -m benchmarks.ab 60000 SETTLER_EVENT_LOOP=asyncio
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from settler.config import DEFAULT_REGISTRY
from settler.core.registry import load_registry
from settler.dev import stack as devstack
from settler.ops.sample import StreamShape, generate
from tests import harness


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(events: int, extra: dict[str, str]) -> None:
    env = harness.new_env(Path(tempfile.mkdtemp(prefix="settler-ab-")))
    await harness.create(env)
    try:
        shape = StreamShape(events=events, users=2000, zipf=1.1)
        records = generate(load_registry(DEFAULT_REGISTRY), shape)
        await harness.produce(env.topic, records)
        worker = harness.WorkerProcess(env, **extra)
        await harness.wait_for_log(worker, "partitions assigned", 60)
        jvms = {name: pid for name, pid in devstack.pids().items() if pid}
        before = {name: cpu_seconds(pid) for name, pid in jvms.items()}
        worker_before, started = cpu_seconds(worker.proc.pid), time.monotonic()
        await harness.wait_caught_up(env, 600, worker)
        elapsed = time.monotonic() - started
        worker_cpu = (cpu_seconds(worker.proc.pid) - worker_before) / elapsed
        jvm_cpu = {name: (cpu_seconds(pid) - before[name]) / elapsed for name, pid in jvms.items()}
        worker.stop()
        print(f"{' '.join(f'{k}={v}' for k, v in extra.items()) or 'defaults'}: "
              f"{len(records)} events in {elapsed:.1f}s = {len(records) / elapsed:,.0f} events/s;"
              f" CPU worker {worker_cpu:.2f}, "
              + ", ".join(f"{name} {value:.2f}" for name, value in jvm_cpu.items())
              + f"; load {os.getloadavg()[0]:.2f}")
    finally:
        await harness.destroy(env)


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 60000
    settings = dict(arg.split("=", 1) for arg in sys.argv[2:])
    asyncio.run(main(count, settings))
