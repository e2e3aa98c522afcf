"""Connecting to Cassandra/ScyllaDB with scylla-driver, and awaiting its futures in asyncio.

The driver runs its own I/O thread; `run()` bridges a driver ResponseFuture into an
asyncio future on the caller's loop. Which driver errors are worth retrying is decided
here, once, by `is_transient()`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Sequence
from typing import Any

from cassandra import (
    ConsistencyLevel,
    InvalidRequest,
    OperationTimedOut,
    ReadFailure,
    ReadTimeout,
    Unavailable,
    WriteFailure,
    WriteTimeout,
)
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    Session,
)
from cassandra.connection import ConnectionException
from cassandra.policies import DCAwareRoundRobinPolicy, RoundRobinPolicy, TokenAwarePolicy
from cassandra.protocol import ServerError
from cassandra.query import tuple_factory

from settler.config import ConfigError, Settings


class MissingResult(Exception):
    """A read completed without a result set (seen from the driver right after a node
    resumed). Retried like a timeout; never taken for "no rows", which the duplicate check
    must not believe without an answer."""


def rows_of(result: Any) -> Any:
    if result is None:
        raise MissingResult("read returned no result set")
    return result


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    MissingResult,
    OperationTimedOut,
    NoHostAvailable,
    Unavailable,
    ReadTimeout,
    WriteTimeout,
    ReadFailure,
    WriteFailure,
    ConnectionException,
    ServerError,
    ConnectionError,
    TimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    """Timeouts and unavailable nodes pass; anything else (a rejected query) is a bug."""
    return isinstance(exc, TRANSIENT_ERRORS)


def contact_points(settings: Settings) -> tuple[list[str], int]:
    hosts: list[str] = []
    ports: set[int] = set()
    for item in settings.cql_contact_points:
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(
                f"SETTLER_CQL_CONTACT_POINTS: expected host:port, got {item!r}"
            )
        hosts.append(host)
        ports.add(int(port))
    if len(ports) != 1:
        raise ConfigError("SETTLER_CQL_CONTACT_POINTS: all contact points must share one port")
    return hosts, ports.pop()


def make_cluster(settings: Settings, *, request_timeout_s: float | None = None) -> Cluster:
    hosts, port = contact_points(settings)
    balancing = TokenAwarePolicy(
        DCAwareRoundRobinPolicy(local_dc=settings.cql_local_dc)
        if settings.cql_local_dc
        else RoundRobinPolicy()
    )
    profile = ExecutionProfile(
        load_balancing_policy=balancing,
        consistency_level=getattr(ConsistencyLevel, settings.cql_consistency),
        request_timeout=request_timeout_s or settings.cql_request_timeout_s,
        # Plain tuples: the default named-tuple factory builds a new class per result
        # set, which showed in the worker's profile; every reader here unpacks by position.
        row_factory=tuple_factory,
    )
    auth = None
    if settings.cql_username:
        auth = PlainTextAuthProvider(settings.cql_username, settings.cql_password or "")
    ssl_context = None
    if settings.cql_ssl_cafile:
        ssl_context = ssl.create_default_context(cafile=settings.cql_ssl_cafile)
        if settings.cql_ssl_certfile:
            ssl_context.load_cert_chain(settings.cql_ssl_certfile, settings.cql_ssl_keyfile)
    return Cluster(
        contact_points=hosts,
        port=port,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        auth_provider=auth,
        ssl_context=ssl_context,
        protocol_version=4,
        connect_timeout=5,
        control_connection_timeout=5,
        # One connection per host saturates a small node; Scylla's shard-aware
        # driver opens one per shard by itself.
        idle_heartbeat_interval=10,
        # The driver leaves Nagle on: a request written behind an unacknowledged one then
        # waits for the server's delayed ACK (~40 ms on Linux). That was most of the
        # worker's produce -> settled latency (BENCHMARKS.md, Optimizations).
        sockopts=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )


def connect(settings: Settings, *, keyspace: str | None = None) -> tuple[Cluster, Session]:
    """Blocking connect (run it in a thread from async code)."""
    cluster = make_cluster(settings)
    try:
        session = cluster.connect()
        if keyspace is not None:
            # The driver reports a missing keyspace as "no host available", which looks
            # transient; say what it is instead.
            if keyspace not in cluster.metadata.keyspaces:
                raise InvalidRequest(f"keyspace {keyspace!r} does not exist")
            session.set_keyspace(keyspace)
    except Exception:
        cluster.shutdown()
        raise
    return cluster, session


def run(session: Session, statement: Any, parameters: Sequence[Any] | None = None,
        *, timeout: float | None = None) -> asyncio.Future[Any]:
    """Execute asynchronously; the returned asyncio future resolves to ALL the result rows
    (every page: a caller that assumes one page would silently miss rows)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    if timeout is None:
        response = session.execute_async(statement, parameters)
    else:
        response = session.execute_async(statement, parameters, timeout=timeout)
    pages: list[Any] = []

    def on_rows(rows: Any) -> None:
        if response.has_more_pages:
            pages.extend(rows)
            response.start_fetching_next_page()
            return
        if pages:
            rows = [*pages, *rows]
        loop.call_soon_threadsafe(_resolve, future, rows, None)

    def on_error(exc: BaseException) -> None:
        loop.call_soon_threadsafe(_resolve, future, None, exc)

    response.add_callbacks(on_rows, on_error)
    return future


def _resolve(future: asyncio.Future[Any], rows: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(rows)
