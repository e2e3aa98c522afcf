"""The worker's role, standby or writer, until it stops: a standby waits for the writer
lease; a writer holds it (settler.worker.tenure) and runs writer sessions under that hold,
one epoch each, then is a standby again.

The takeover wait (settler.worker.takeover) is waited out here: before a hold's first
session when the lease was taken over expired, and before a new session when the last one
abandoned work that may still land.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from settler import logs, metrics
from settler.config import ConnectionSettingError, Settings
from settler.core.registry import Registry
from settler.store import cql
from settler.store.lease import WriterLease
from settler.worker.ports import Clients, Store
from settler.worker.retry import Retrier, Stopping
from settler.worker.session import CLOSE_TIMEOUT_S, SessionEnd, WriterSession
from settler.worker.takeover import restarted_node_wait
from settler.worker.tenure import Lapsed, Tenure

log = logs.get("settler.worker")


class WriterRole:
    """Alternates standby and writer tenures on one database session until stopped."""

    def __init__(self, *, settings: Settings, registry: Registry, clients: Clients,
                 store: Store, server: str, health: metrics.Health, stopping: asyncio.Event,
                 retrier: Retrier, takeover_wait: int, batch_max_bytes: int,
                 refused_values: set[tuple[str, int, int]],
                 refused: Callable[[str, ConnectionSettingError], None]) -> None:
        self.settings = settings
        self.registry = registry
        self.clients = clients
        self.store = store
        self.server = server
        self.health = health
        self.stopping = stopping
        self.retrier = retrier
        self.takeover_wait = takeover_wait
        self.batch_max_bytes = batch_max_bytes
        self.refused_values = refused_values  # see DeadLetters: for the worker's lifetime
        self.refused = refused  # readiness and the log name the setting a server refused

    async def run(self) -> int:
        """The exit code: 0 once stopped, 1 after a session's non-retryable error."""
        lease = WriterLease(self.store.lease_table(), ttl_s=self.settings.lease_ttl_s,
                            clock=self.clients.clock)
        while not self.stopping.is_set():
            self.health.role = "standby"
            tenure = Tenure(lease, self.stopping, self._cql_down)
            if not await tenure.acquire():
                break
            # After an expired lease a wait is owed even if its time already passed (a take
            # delayed by a database that was down): the restarted-node check still runs.
            owed = lease.takeover_wait_s(self.takeover_wait) if lease.took_over_expired else None
            end = await self._hold(tenure, owed)
            if end is SessionEnd.FATAL:
                return 1
            if end is SessionEnd.STOPPED:
                break
        return 0

    async def _hold(self, tenure: Tenure, wait: float | None) -> SessionEnd:
        """Writer sessions under one hold of the lease, until it ends. `wait`: the takeover
        wait owed before the first session reads (None: none owed)."""
        while True:
            if wait is not None and not await self._wait_out(tenure, wait):
                # Stopped or lapsed during the wait: keep the lease unreleased, so the
                # next writer waits too.
                await tenure.end(release=False, timeout_s=CLOSE_TIMEOUT_S)
                return SessionEnd.STOPPED if self.stopping.is_set() else SessionEnd.LAPSED
            try:
                progress = await self.retrier.run("cql_read", self.store.progress)
            except Stopping:
                await tenure.end(release=False, timeout_s=CLOSE_TIMEOUT_S)
                return SessionEnd.STOPPED
            self.health.role = "writer"
            metrics.WRITER.set(1)
            session = WriterSession(
                settings=self.settings, registry=self.registry, clients=self.clients,
                store=self.store, tenure=tenure, progress=progress, health=self.health,
                stopping=self.stopping, batch_max_bytes=self.batch_max_bytes,
                refused_values=self.refused_values)
            try:
                end = await session.run()
            except ConnectionSettingError as exc:
                self.refused("kafka", exc)
                await tenure.end(release=True, timeout_s=CLOSE_TIMEOUT_S)  # nothing written
                raise
            metrics.WRITER.set(0)
            self.health.checks["partitions"] = False
            if end is not SessionEnd.ABANDONED:
                # Released only when no batch of ours can land later; otherwise it expires
                # and the next writer waits out the takeover wait.
                await tenure.end(release=end is SessionEnd.STOPPED and session.clean,
                                 timeout_s=CLOSE_TIMEOUT_S)
                return end
            # Abandoned work may still land (the batchlog): the next session waits it out.
            wait = None if session.clean else float(self.takeover_wait)
            try:
                await tenure.rotate()
            except Lapsed:
                await tenure.end(release=False, timeout_s=CLOSE_TIMEOUT_S)
                return SessionEnd.LAPSED
            except Exception as exc:
                if not cql.is_transient(exc):
                    raise
                await tenure.end(release=False, timeout_s=CLOSE_TIMEOUT_S)
                return SessionEnd.LAPSED

    async def _wait_out(self, tenure: Tenure, seconds: float) -> bool:
        """The takeover wait, and longer while a database node restarted too recently to
        have replayed its batchlog. False if stopped or lapsed meanwhile."""
        # A writer that died (or a session that abandoned work) may have batches in the
        # batchlog that land later: reading rows before they do, then writing newer cells,
        # could undo them. The lease is renewed meanwhile.
        log.info("waiting for the previous writer's batches to settle", seconds=round(seconds, 1),
                 epoch=tenure.epoch)
        waited = await tenure.wait(seconds)
        restarted = await restarted_node_wait(self.server, self.store.node_uptimes)
        if waited and restarted > 0:
            log.info("waiting until a restarted database node has replayed its batchlog",
                     seconds=round(restarted, 1), epoch=tenure.epoch)
            waited = await tenure.wait(restarted)
        return waited

    def _cql_down(self, exc: BaseException) -> None:
        self.health.checks["cql"] = False
        metrics.retry("cql_lease")
        log.warning("database unavailable, retrying", error=repr(exc))
