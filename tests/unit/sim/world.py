"""A deterministic world of processes in virtual time, for the crash simulation.

Each simulated process (a worker) has its own asyncio event loop; all share one virtual
clock. `World.step()` runs ONE ready callback of one process, chosen by the seeded
random generator, so processes interleave at every await point; when nothing is ready,
the clock jumps to the next timer (of any process, or of the world: a database applying
a request, a broker finishing a rebalance). A process killed (SIGKILL) simply never runs
again: its pending callbacks and futures are dropped with its loop, exactly as a dead
process leaves its sockets. A paused process (SIGSTOP) runs nothing until resumed, while
the world's clock goes on.

Everything the worker awaits comes from here: `asyncio.sleep`, `wait_for`, timeouts and
the simulated I/O all use the process loop's `time()`, which is the world clock.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import threading
from asyncio import events
from collections.abc import Callable, Coroutine
from typing import Any


class SimLoop(asyncio.BaseEventLoop):
    """An event loop that only runs when the world steps it."""

    def __init__(self, world: World, name: str) -> None:
        super().__init__()
        self.world = world
        self.name = name
        self.set_exception_handler(self._exception)

    def time(self) -> float:
        return self.world.now

    def _write_to_self(self) -> None:
        pass

    def _check_closed(self) -> None:
        # A killed process's coroutines may be finalized (at garbage collection or exit)
        # and schedule callbacks on the way out: they are accepted and never run.
        pass

    def _process_events(self, event_list: Any) -> None:
        pass

    def _exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.world.unhandled.append((self.name, context))


class Process:
    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.name = name
        self.loop = SimLoop(world, name)
        self.alive = True
        self.paused = False
        self.main: asyncio.Task[Any] | None = None

    def start(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        self.main = self.loop.create_task(coroutine)
        return self.main

    def due(self) -> bool:
        return self.alive and not self.paused and bool(self.loop._ready)  # type: ignore[attr-defined]

    def next_timer(self) -> float | None:
        scheduled = self.loop._scheduled  # type: ignore[attr-defined]
        while scheduled and scheduled[0]._cancelled:
            heapq.heappop(scheduled)._scheduled = False
        return scheduled[0]._when if scheduled else None

    def move_due_timers(self) -> None:
        scheduled = self.loop._scheduled  # type: ignore[attr-defined]
        while scheduled and scheduled[0]._when <= self.world.now:
            handle = heapq.heappop(scheduled)
            handle._scheduled = False
            if not handle._cancelled:
                self.loop._ready.append(handle)  # type: ignore[attr-defined]

    def run_one(self) -> None:
        handle = self.loop._ready.popleft()  # type: ignore[attr-defined]
        if handle._cancelled:
            return
        self.loop._thread_id = threading.get_ident()  # type: ignore[attr-defined]
        events._set_running_loop(self.loop)
        try:
            handle._run()
        finally:
            events._set_running_loop(None)
            self.loop._thread_id = None  # type: ignore[attr-defined]

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> None:
        """Deliver something to this process at `when` (dropped if it died meanwhile)."""
        if self.alive:
            self.loop.call_at(when, callback, *args)

    def kill(self) -> None:
        self.alive = False


class World:
    def __init__(self, rng: random.Random, start: float = 1_700_000_000.0) -> None:
        self.rng = rng
        self.now = start
        self.processes: list[Process] = []
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.unhandled: list[tuple[str, dict[str, Any]]] = []
        self.steps = 0

    def process(self, name: str) -> Process:
        process = Process(self, name)
        self.processes.append(process)
        return process

    def at(self, when: float, callback: Callable[[], None]) -> None:
        """Something that happens in the world (not in a process) at `when`."""
        heapq.heappush(self._timers, (max(when, self.now), next(self._seq), callback))

    def after(self, delay: float, callback: Callable[[], None]) -> None:
        self.at(self.now + delay, callback)

    def step(self) -> bool:
        """Run one callback somewhere, advancing time if nothing is ready. False when
        nothing will ever happen again."""
        self.steps += 1
        while self._timers and self._timers[0][0] <= self.now:
            _, _, callback = heapq.heappop(self._timers)
            callback()
        for process in self.processes:
            if process.alive and not process.paused:
                process.move_due_timers()
        ready = [process for process in self.processes if process.due()]
        if ready:
            self.rng.choice(ready).run_one()
            return True
        upcoming = [when for process in self.processes
                    if process.alive and not process.paused
                    for when in [process.next_timer()] if when is not None]
        if self._timers:
            upcoming.append(self._timers[0][0])
        if not upcoming:
            return False
        self.now = max(self.now, min(upcoming))
        return True

    def run_until(self, done: Callable[[], bool], *, limit_s: float,
                  max_steps: int = 5_000_000) -> None:
        """Step until `done()`; fails if virtual time passes `limit_s` from now."""
        deadline = self.now + limit_s
        start_steps = self.steps
        while not done():
            if self.now > deadline:
                raise AssertionError(f"not done within {limit_s} virtual seconds")
            if self.steps - start_steps > max_steps:
                raise AssertionError(f"not done within {max_steps} steps")
            if not self.step():
                raise AssertionError("the world stopped: nothing left to happen")
