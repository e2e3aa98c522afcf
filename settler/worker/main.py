"""The worker process: serve metrics, connect to the database and Kafka, derive the takeover
wait and the batch bound from the database, then take the writer role (standby and writer
tenures, settler.worker.role) until stopped. Exit codes: 0 after SIGTERM/SIGINT, 1 on a
non-retryable error, 2 when a server refuses the settings (raised to the command)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Final

from aiokafka.errors import KafkaError
from cassandra import InvalidRequest

from settler import logs, metrics
from settler.config import ConfigError, ConnectionSettingError, Settings
from settler.core.registry import Registry, load_registry
from settler.timeouts import within
from settler.worker.ports import Clients, Store, production_clients
from settler.worker.retry import Backoff, Retrier, Stopping
from settler.worker.role import WriterRole
from settler.worker.session import CLOSE_TIMEOUT_S
from settler.worker.takeover import takeover_wait_s

log = logs.get("settler.worker")

DEFAULT_BATCH_MAX_BYTES: Final = 40 * 1024
KAFKA_CHECK_TIMEOUT_S: Final = 5.0
ERROR_CLOSE_TIMEOUT_S: Final = 10.0
BATCH_BYTES_SHARE: Final = 0.8


class Worker:
    """Starts up, runs the writer role until stopped, and shuts down within the budget."""

    def __init__(self, settings: Settings, registry: Registry,
                 clients: Clients | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.clients = clients or production_clients(settings)
        self.health = metrics.Health()
        self.stopping = asyncio.Event()
        self.refused_values: set[tuple[str, int, int]] = set()  # see DeadLetters
        self.close_timed_out = False
        self.retrier = Retrier(Backoff(settings.retry_initial_ms / 1000,
                                       settings.retry_max_ms / 1000),
                               ending=self.stopping.is_set, wake=self.stopping,
                               health=self.health)
        metrics.declare_assets(asset.name for asset in registry.assets_by_id.values())

    async def run(self) -> int:
        server = None
        if self.clients.serve_metrics:
            host, port = self.settings.metrics_host, self.settings.metrics_port
            try:
                server = await metrics.serve(host, port, self.health)
            except OSError as exc:
                raise ConfigError(f"SETTLER_METRICS_PORT: cannot serve metrics on {host}:{port}"
                                  f" ({exc.strerror or exc}); is another worker using it?"
                                  ) from None
            log.info("worker starting", metrics=f"http://{self.settings.metrics_host}:"
                     f"{self.settings.metrics_port}/metrics",
                     settings=self.settings.redacted())
        try:
            return await self._run()
        finally:
            if server is not None:
                server.close()

    async def _run(self) -> int:
        try:
            store = await self.retrier.run("cql_connect", self.clients.open_store)
        except Stopping:
            return 0
        except InvalidRequest as exc:
            log.error("the keyspace or its tables are missing: run `settler schema apply`",
                      keyspace=self.settings.keyspace, error=str(exc))
            return 1
        except ConnectionSettingError as exc:
            self.refused("cql", exc)
            raise
        self.health.checks["cql"] = True
        try:
            await self._check_kafka()
        except ConnectionSettingError as exc:
            self.refused("kafka", exc)
            await within(ERROR_CLOSE_TIMEOUT_S, store.close())
            raise
        # Readiness follows the database even while idle: without traffic no call would
        # notice it going away, or coming back.
        probe = asyncio.ensure_future(self.health.probe("cql", store.probe))
        code = 0
        try:
            server = await self.retrier.run("cql_read", store.server)
            takeover_wait, batch_max_bytes = await self._derived(store, server)
            code = await WriterRole(
                settings=self.settings, registry=self.registry, clients=self.clients,
                store=store, server=server, health=self.health, stopping=self.stopping,
                retrier=self.retrier, takeover_wait=takeover_wait,
                batch_max_bytes=batch_max_bytes, refused_values=self.refused_values,
                refused=self.refused).run()
        except Stopping:
            code = 0
        finally:
            probe.cancel()
            metrics.WRITER.set(0)
            # Within the SIGTERM budget when stopping; otherwise (exiting on an error) let
            # the driver finish, so nothing it logs comes after the command's last line.
            timeout = CLOSE_TIMEOUT_S if self.stopping.is_set() else ERROR_CLOSE_TIMEOUT_S
            try:
                await within(timeout, store.close())
            except TimeoutError:
                log.warning("closing the database session timed out")
                self.close_timed_out = True
        log.info("worker stopped", exit_code=code)
        return code

    async def _derived(self, store: Store, server: str) -> tuple[int, int]:
        """The takeover wait and the batch bound: set, or derived from the database."""
        wait = self.settings.takeover_wait_s
        derived = takeover_wait_s(server, self.settings.cql_request_timeout_s)
        if wait is None:
            wait = derived
            log.info("takeover wait derived from the database", server=server, seconds=wait)
        elif wait < derived:
            log.warning("SETTLER_TAKEOVER_WAIT_S is below what the database needs: a former"
                        " writer's batch may land after the next writer read",
                        seconds=wait, needed=derived, server=server)
        limit = self.settings.batch_max_bytes
        if limit is None:
            threshold = await self.retrier.run("cql_read", store.batch_fail_threshold)
            limit = int(threshold * BATCH_BYTES_SHARE) if threshold else DEFAULT_BATCH_MAX_BYTES
            log.info("batch bound derived from the database", fail_threshold_bytes=threshold,
                     batch_max_bytes=limit)
        return wait, limit

    async def _check_kafka(self) -> None:
        """A refused Kafka login must end a standby too, not only the writer that would meet
        it when its session starts. One bounded attempt: a broker that is merely down is
        the writer session's to wait for."""
        if self.clients.check_kafka is None:
            return
        try:
            await within(KAFKA_CHECK_TIMEOUT_S, self.clients.check_kafka())
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("Kafka not reachable yet; the writer session retries", error=repr(exc))

    def refused(self, check: str, exc: ConnectionSettingError) -> None:
        """Readiness and the log say which setting a server refused; the command then exits
        2 with the same line."""
        self.health.checks[check] = False
        self.health.error = str(exc)
        log.error("a server refused the settings; exiting without retry",
                  setting=exc.setting, server=exc.server, error=str(exc))


def run_worker(settings: Settings) -> int:
    """Entry point of `settler run`: exit code 0 on SIGTERM/SIGINT after draining."""
    logs.configure(settings.log_level, settings.log_format)
    registry = load_registry(settings.registry)
    runner = asyncio.run
    if settings.event_loop in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if settings.event_loop == "uvloop":
                raise ConfigError("SETTLER_EVENT_LOOP: uvloop is not installed") from None
        else:
            runner = uvloop.run

    workers: list[Worker] = []

    async def main() -> int:
        worker = Worker(settings, registry)
        workers.append(worker)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stopping.set)
        return await worker.run()

    code = runner(main())
    if workers and workers[0].close_timed_out:
        # The driver's exit hook would shut the stuck session down again and hold the
        # exit for its heartbeat timeout: everything is settled, committed and logged.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
