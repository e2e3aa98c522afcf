"""Settlement batches through acsylla (the ScyllaDB/DataStax C++ driver under Python).

Binding, encoding and socket I/O happen in C++ without the GIL: about a quarter of
scylla-driver's CPU per row (BENCHMARKS.md "Drivers"), which was most of what one writer
spent per event. The write path's batches and its own reads (rows of a user, id claims,
progress) come here; everything else (API and CLI reads, the lease's LWTs, the probe,
refused-setting diagnosis) stays on scylla-driver. Driver errors are translated to the
cassandra exceptions the write path already classifies (transient: retried; "Batch too
large": split; anything else: fatal).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import acsylla
from cassandra import InvalidRequest, OperationTimedOut

from settler.config import ConnectionSettingError, Settings
from settler.store import cql
from settler.store.batches import Batch

_log = logging.getLogger("acsylla")

_TRANSIENT: Final = tuple(getattr(acsylla.errors, name) for name in (
    "CassErrorServerWriteTimeout", "CassErrorServerReadTimeout", "CassErrorServerUnavailable",
    "CassErrorServerOverloaded", "CassErrorServerIsBootstrapping", "CassErrorServerWriteFailure",
    "CassErrorServerServerError", "CassErrorLibRequestTimedOut", "CassErrorLibNoHostsAvailable",
    "CassErrorLibUnableToConnect", "CassErrorLibRequestQueueFull", "CassErrorLibWriteError",
    "CassErrorLibNoStreams", "CassExceptionConnectionError",
))


async def _driver_log(message: Any) -> None:
    # The C++ driver's own messages (reconnects, "no shard awareness" on Cassandra) go to
    # the process's logging at debug: the worker's errors are its own lines.
    _log.debug("%s", message)


def translate(exc: BaseException) -> BaseException:
    """The cassandra-driver exception the write path classifies (cql.is_transient)."""
    translated: BaseException = exc
    if isinstance(exc, _TRANSIENT):
        translated = OperationTimedOut(f"acsylla: {exc}")
    elif isinstance(exc, acsylla.errors.CassErrorServerInvalidQuery):
        translated = InvalidRequest(str(exc))
    return translated


class AcsyllaWriter:
    def __init__(self, session: Any, prepared: dict[str, Any]) -> None:
        self.session = session
        self.prepared = prepared

    @classmethod
    async def open(cls, settings: Settings, statements: Mapping[str, str]) -> AcsyllaWriter:
        """Connect with the same settings as scylla-driver and prepare `statements`."""
        hosts, port = cql.contact_points(settings)
        options = await asyncio.to_thread(_connection_options, settings, port)
        server = f"{hosts[0]}:{port}"
        cluster = acsylla.create_cluster(hosts, **options)
        try:
            session = await cluster.create_session(keyspace=settings.keyspace)
        except acsylla.errors.CassErrorServerBadCredentials as exc:
            raise ConnectionSettingError(
                "SETTLER_CQL_USERNAME/SETTLER_CQL_PASSWORD", server,
                f"the CQL server at {server} refused the login ({exc})") from None
        except acsylla.errors.CassErrorSourceSsl as exc:
            raise ConnectionSettingError(
                "SETTLER_CQL_SSL_CAFILE", server,
                f"TLS with the CQL server at {server} failed ({exc})") from None
        except Exception as exc:
            raise translate(exc) from exc
        prepared = {}
        try:
            for name, text in statements.items():
                prepared[name] = await session.create_prepared(text)
        except Exception as exc:
            await session.close()
            raise translate(exc) from exc
        return cls(session, prepared)

    async def execute(self, batch: Batch) -> None:
        driver = (acsylla.create_batch_logged() if batch.logged
                  else acsylla.create_batch_unlogged())
        prepared = self.prepared
        for name, values in batch.statements:
            statement = prepared[name].bind()
            statement.bind_list(list(values))
            driver.add_statement(statement)
        driver.set_is_idempotent(True)  # identical cells and timestamp on every attempt
        try:
            await self.session.execute_batch(driver)
        except Exception as exc:
            raise translate(exc) from exc

    async def query(self, name: str, parameters: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Every row of a prepared read, page after page."""
        statement = self.prepared[name].bind()
        statement.bind_list(list(parameters))
        rows: list[tuple[Any, ...]] = []
        try:
            while True:
                result = await self.session.execute(statement)
                rows += [row.as_tuple() for row in result]
                if not result.has_more_pages():
                    return rows
                statement.set_page_state(result.page_state())
        except Exception as exc:
            raise translate(exc) from exc

    async def close(self) -> None:
        await self.session.close()


def _connection_options(settings: Settings, port: int) -> dict[str, Any]:
    """The same connection as scylla-driver's: timeouts, consistency, datacenter, login, TLS
    (the CA and client certificate as PEM text, as the C++ driver takes them)."""
    options: dict[str, Any] = {
        "port": port, "consistency": settings.cql_consistency,
        "request_timeout": float(settings.cql_request_timeout_s),
        "connect_timeout": 5.0, "log_level": "warn", "logging_callback": _driver_log,
        "tcp_nodelay": True,
    }
    if settings.cql_local_dc:
        options["load_balance_dc_aware"] = settings.cql_local_dc
    if settings.cql_username:
        options["username"] = settings.cql_username
        options["password"] = settings.cql_password or ""
    if settings.cql_ssl_cafile:
        options["ssl_enabled"] = True
        options["ssl_trusted_cert"] = Path(settings.cql_ssl_cafile).read_text()
        options["ssl_verify_flags"] = ("PEER_IDENTITY" if settings.cql_ssl_check_hostname
                                       else "PEER_CERT")
        if settings.cql_ssl_certfile:
            options["ssl_cert"] = Path(settings.cql_ssl_certfile).read_text()
            options["ssl_private_key"] = Path(
                settings.cql_ssl_keyfile or settings.cql_ssl_certfile).read_text()
    return options
