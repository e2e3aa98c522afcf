"""The writer's tenure: one hold of the lease, from taking it to releasing it.

The tenure rule (ARCHITECTURE.md "Why one writer"): the lease is renewed from the moment
it is taken until it is released, through the takeover wait and every writer session,
and this worker writes, settles and commits only while the lease is *valid* (renewed
within `VALID_SHARE` of its TTL). The moment validity lapses, `lapsed` is set and every
session of the tenure ends, abandoning in-flight work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final

from settler import logs, metrics
from settler.store import cql
from settler.store.lease import Holder, LeaseLost, WriterLease
from settler.timeouts import within
from settler.worker.retry import Stopping

log = logs.get("settler.worker")

RENEW_RETRY_S: Final = 0.5
STANDBY_POLL_S: Final = 1.0
STANDBY_LOG_EVERY_S: Final = 30.0
AHEAD_WARNING_S: Final = 1.0


class Lapsed(Exception):
    """The lease is no longer valid: stop writing, settling and committing at once."""


class Tenure:
    def __init__(self, lease: WriterLease, stopping: asyncio.Event,
                 on_db_error: Callable[[BaseException], None]) -> None:
        self.lease = lease
        self.stopping = stopping
        self.on_db_error = on_db_error
        self.lapsed = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None

    # -- taking it ------------------------------------------------------------------------

    async def acquire(self) -> bool:
        """Wait as a standby until the lease is ours (True) or the worker stops (False)."""
        logged_at = -STANDBY_LOG_EVERY_S
        clock = self.lease.clock
        while not self.stopping.is_set():
            try:
                holder = await self.lease.try_acquire()
            except Exception as exc:
                if not cql.is_transient(exc):
                    raise
                self.on_db_error(exc)
                holder = Holder("unknown (database unavailable)", 0, 0, 0)
            if holder is None:
                self._start()
                return True
            if clock.monotonic() - logged_at > STANDBY_LOG_EVERY_S:
                logged_at = clock.monotonic()
                log.info("standby: another worker holds the writer lease",
                         holder=holder.owner, expires_at_ms=holder.expires_at_ms)
            await self.sleep(STANDBY_POLL_S)
        return False

    def _start(self) -> None:
        self.lapsed.clear()
        metrics.LEASE_VALID.set(1)
        ahead_s = self.lease.behind_us / 1e6
        metrics.TIMESTAMP_AHEAD.set(ahead_s)
        if ahead_s > AHEAD_WARNING_S:
            log.warning("write timestamps start ahead of this host's clock: a former writer's "
                        "clock was ahead (ts_ceiling); writes go on, timestamps catch up",
                        ahead_s=round(ahead_s, 3))
        log.info("writer lease taken", owner=self.lease.owner, epoch=self.lease.epoch,
                 took_over_expired=self.lease.took_over_expired)
        self._keeper = asyncio.ensure_future(self._keep())

    # -- holding it -----------------------------------------------------------------------

    async def _keep(self) -> None:
        """Renew every third of the TTL (sooner after a failure) until released; set
        `lapsed` as soon as validity ends, even while a renewal hangs."""
        lease, clock = self.lease, self.lease.clock
        renew_at = clock.monotonic() + lease.ttl_s / 3
        while True:
            await asyncio.sleep(max(0.0, min(renew_at, lease.valid_until) - clock.monotonic()))
            if not lease.valid:
                self._lapse("the lease was not renewed in time")
                return
            try:
                renewed = await within(max(0.01, lease.valid_until - clock.monotonic()),
                                       lease.renew())
            except TimeoutError:
                renew_at = clock.monotonic()
                continue
            except Exception as exc:  # noqa: BLE001 - any failure ends or retries renewal
                if not cql.is_transient(exc):
                    log.error("renewing the writer lease was rejected", error=repr(exc))
                    self._lapse(f"renewal rejected: {exc!r}")
                    return
                self.on_db_error(exc)
                renew_at = clock.monotonic() + RENEW_RETRY_S
                continue
            if not renewed:
                self._lapse("the lease was not renewed in time, or another worker took it")
                return
            metrics.TIMESTAMP_AHEAD.set(lease.behind_us / 1e6)
            renew_at = clock.monotonic() + lease.ttl_s / 3

    def _lapse(self, why: str) -> None:
        if self.lapsed.is_set():
            return
        metrics.LEASE_VALID.set(0)
        metrics.LEASE_LAPSES.inc()
        log.error("writer lease lapsed: abandoning in-flight work, back to standby", why=why,
                  epoch=self.lease.epoch)
        self.lease.held = False
        self.lapsed.set()

    @property
    def valid(self) -> bool:
        if self.lapsed.is_set():
            return False
        if not self.lease.valid:
            # Whoever sees validity gone ends the tenure at once, not at the keeper's next
            # wake-up: a group dropped for it must never go unnoticed by the session.
            self._lapse("the lease was not renewed in time")
            return False
        return True

    @property
    def epoch(self) -> int:
        return self.lease.epoch

    async def timestamp(self) -> int:
        """A fenced write timestamp; waits while a renewal is pending."""
        while (ts := self.lease.next_timestamp()) is None:
            if self.lapsed.is_set():
                raise Lapsed
            if self.stopping.is_set():
                raise Stopping
            await asyncio.sleep(0.05)
        return ts

    async def wait(self, seconds: float) -> bool:
        """Sleep while holding (and renewing) the lease. False if the tenure lapsed or the
        worker was asked to stop meanwhile."""
        waits = [asyncio.ensure_future(self.lapsed.wait()),
                 asyncio.ensure_future(self.stopping.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return not self.lapsed.is_set() and not self.stopping.is_set()

    async def rotate(self) -> None:
        """Start a new writer session under this hold (the next epoch)."""
        try:
            await self.lease.rotate()
        except LeaseLost:
            self._lapse("another worker holds the lease")
            raise Lapsed from None

    async def end(self, *, release: bool, timeout_s: float) -> None:
        """Stop renewing; release the lease if asked (a standby takes over at once),
        otherwise let it expire (the next writer then waits out the takeover wait)."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        metrics.LEASE_VALID.set(0)
        if not release or not self.lease.held:
            self.lease.held = False
            return
        try:
            await within(timeout_s, self.lease.release())
        except Exception as exc:  # noqa: BLE001 - the lease lapses by itself
            log.warning("could not release the writer lease; a standby takes over when it "
                        "expires", ttl_s=self.lease.ttl_s, error=repr(exc))

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await within(seconds, self.stopping.wait())
