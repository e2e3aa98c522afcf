"""Retrying transient failures with capped exponential backoff, for as long as the writer
session may go on: a session that is ending abandons its retries (`Stopping`)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from settler import logs, metrics
from settler.store import cql
from settler.timeouts import within

log = logs.get("settler.worker")

T = TypeVar("T")


class Stopping(Exception):
    """Raised inside waits when the session ends (stop asked, lease lapsed, fatal error)."""


@dataclass(frozen=True, slots=True)
class Backoff:
    initial_s: float
    max_s: float

    def delays(self) -> Iterable[float]:
        delay = self.initial_s
        while True:
            yield delay * (0.5 + random.random() / 2)
            delay = min(delay * 2, self.max_s)


class Retrier:
    """Runs an attempt until it succeeds; between attempts sleeps with backoff, counts the
    retry by kind, and reports the outcome to readiness."""

    def __init__(self, backoff: Backoff, ending: Callable[[], bool], wake: asyncio.Event,
                 health: metrics.Health) -> None:
        self.backoff = backoff
        self.ending = ending  # True once the session must stop retrying
        self.wake = wake  # set when the session ends, to cut sleeps short
        self.health = health

    async def run(self, kind: str, attempt: Callable[[], Awaitable[T]],
                  transient: Callable[[BaseException], bool] = cql.is_transient) -> T:
        delays = iter(self.backoff.delays())
        while True:
            if self.ending():
                raise Stopping
            try:
                result = await attempt()
            except Exception as exc:
                if not transient(exc):
                    raise
                metrics.retry(kind)
                self.report(kind, ok=False)
                log.warning("transient failure, retrying", kind=kind, error=repr(exc))
            else:
                self.report(kind, ok=True)
                return result
            if self.ending():
                raise Stopping  # a drain finishes what succeeds at once, abandons the rest
            await self.sleep(next(delays))

    def report(self, kind: str, *, ok: bool) -> None:
        """Readiness follows the outcome of the latest database or broker call."""
        self.health.checks["cql" if kind.startswith("cql") else "kafka"] = ok

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await within(seconds, self.wake.wait())
