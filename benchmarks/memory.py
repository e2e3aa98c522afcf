"""Worker memory against distinct users: RSS of `settler run` while it settles one deposit
per new user, once with the default cache bounds and once with small ones.

Each configuration is one worker run over one stream; VmRSS is sampled every second with
the worker's settled count and cache gauges, and the table reads it off where the settled
count first passes each checkpoint. A time budget caps the largest checkpoint (1M users
becomes 300k, and the bounded run may stop at 100k) when this machine is too slow for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.settle import outcome_count
from benchmarks.stack import (
    Stack,
    WorkerProcess,
    WorkerSource,
    metric_sum,
    produce,
    progress,
    rss_bytes,
)
from benchmarks.stream import deposit_stream
from settler.core.registry import Registry

SMALL_BOUNDS = {"SETTLER_BALANCE_CACHE_ROWS": "20000", "SETTLER_RECENT_IDS": "50000"}


@dataclass(frozen=True)
class MemorySizes:
    checkpoints: tuple[int, ...]  # distinct users
    fallback: int  # the largest checkpoint when the budget does not allow the first choice
    budget_s: float  # for both runs together, to go to the first choice
    fallback_budget_s: float  # for both runs together, to go to the fallback


FULL = MemorySizes((10_000, 100_000, 1_000_000), 300_000, 1800, 2400)
QUICK = MemorySizes((2_000, 10_000, 30_000), 20_000, 90, 120)


@dataclass
class Sample:
    t: float  # seconds since the worker started
    users: float  # events settled so far = distinct users seen (one deposit each)
    rss: int
    cache_rows: float
    remembered_ids: float


@dataclass
class MemoryRun:
    config: str
    env: dict[str, str]
    samples: list[Sample] = field(default_factory=list)
    peak_rss: int = 0  # VmHWM at the end
    stopped_at: int = 0  # users the run was stopped at (its largest checkpoint)
    wall_s: float = 0.0

    def rss_at(self, users: int) -> Sample | None:
        """The first sample at or past `users` settled."""
        return next((s for s in self.samples if s.users >= users), None)

    @property
    def users_per_s(self) -> float:
        return self.samples[-1].users / self.wall_s if self.samples and self.wall_s else 0.0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "users_per_s": self.users_per_s}


@dataclass
class MemoryResult:
    runs: list[MemoryRun]
    checkpoints: list[int]
    note: str


class Budget:
    """Decides, from the first run's pace, how far each run may go."""

    def __init__(self, sizes: MemorySizes) -> None:
        self.sizes = sizes
        self.started = time.monotonic()
        self.target = sizes.checkpoints[-1]
        self.bounded_target = sizes.checkpoints[-1]
        self.note = ""

    def review(self, users: float, elapsed: float) -> None:
        """Called during the first run once it passed the middle checkpoint."""
        if self.note or users < self.sizes.checkpoints[-2]:
            return
        rate = users / elapsed
        first, fallback = self.sizes.checkpoints[-1], self.sizes.fallback
        if 2 * first / rate <= self.sizes.budget_s:
            self.note = f"both runs go to {first:,} users"
            return
        self.target = self.bounded_target = fallback
        if 2 * fallback / rate > self.sizes.fallback_budget_s:
            self.bounded_target = self.sizes.checkpoints[-2]
        self.note = (
            f"the worker settled {rate:,.0f} new users/s here, so {first:,} users would take "
            f"{2 * first / rate / 60:.0f} min for the two runs: the checkpoints are "
            f"{', '.join(f'{p:,}' for p in self.checkpoints)} users instead, the default run "
            f"stops at {self.target:,} users and the bounded run at {self.bounded_target:,}"
        )

    @property
    def checkpoints(self) -> list[int]:
        return [*self.sizes.checkpoints[:-1], self.target]


async def run_memory(stack: Stack, registry: Registry, sizes: MemorySizes,
                     source: WorkerSource | None = None) -> MemoryResult:
    budget = Budget(sizes)
    produced = min(sizes.fallback, sizes.checkpoints[-1])
    stream = deposit_stream(registry, sizes.checkpoints[-1])
    topic = await stack.topic("memory")
    await produce(stack.bootstrap, topic, stream.records[:produced])
    runs: list[MemoryRun] = []
    for n, (config, env) in enumerate((("defaults", {}), ("small bounds", SMALL_BOUNDS))):
        run = MemoryRun(config, dict(env))

        async def more_users(needed: int) -> None:
            nonlocal produced
            if needed > produced:  # the budget allows the first choice: produce the rest
                await produce(stack.bootstrap, topic, stream.records[produced:needed])
                produced = needed

        await _sample_run(stack, topic, run, budget, n, more_users, source)
        runs.append(run)
    note = budget.note or "every checkpoint reached"
    return MemoryResult(runs, budget.checkpoints, note)


async def _sample_run(stack: Stack, topic: str, run: MemoryRun, budget: Budget, index: int,
                      more_users: Callable[[int], Awaitable[None]],
                      source: WorkerSource | None) -> None:
    """Run a worker over the deposit topic until it settled its target number of users."""
    first = index == 0
    keyspace = await stack.keyspace(f"memory{index}", source)
    group = stack.group(f"memory{index}")
    label = "memory-" + run.config.replace(" ", "-")
    worker = WorkerProcess(stack, topics=[topic], keyspace=keyspace, group=group, label=label,
                           extra_env=run.env, source=source)
    next_report = time.monotonic() + 15
    try:
        while True:
            await asyncio.sleep(1.0)
            worker.check_alive()
            try:
                samples = await worker.metrics()
            except (OSError, TimeoutError):
                continue  # not serving /metrics yet
            sample = _sample(worker, samples)
            run.samples.append(sample)
            if first and not budget.note:
                budget.review(sample.users, sample.t)
                if budget.note:  # decided just now: produce what the chosen target needs
                    await more_users(budget.target)
            target = budget.target if first else budget.bounded_target
            if sample.users >= target:
                break
            if time.monotonic() >= next_report:
                progress(f"  memory ({run.config}): {sample.users:,.0f}/{target:,} users, "
                         f"RSS {sample.rss / 2**20:,.0f} MiB")
                next_report = time.monotonic() + 15
        run.stopped_at = target
        run.peak_rss = rss_bytes(worker.pid, "VmHWM")
        run.wall_s = time.monotonic() - worker.started
    finally:
        worker.stop()
    progress(f"  memory ({run.config}): {run.stopped_at:,} users in {run.wall_s:.0f}s, "
             f"RSS {run.samples[-1].rss / 2**20:,.0f} MiB (peak {run.peak_rss / 2**20:,.0f} MiB)")


def _sample(worker: WorkerProcess, samples: Mapping[str, float]) -> Sample:
    return Sample(
        t=time.monotonic() - worker.started,
        users=outcome_count(samples, "settled"),
        rss=rss_bytes(worker.pid),
        cache_rows=metric_sum(samples, "settler_balance_cache_rows"),
        remembered_ids=metric_sum(samples, "settler_remembered_ids"),
    )
