"""Connecting to Cassandra/ScyllaDB with scylla-driver, and awaiting its futures in asyncio.

The driver runs its own I/O thread; `run()` bridges a driver ResponseFuture into an
asyncio future on the caller's loop. Which driver errors are worth retrying is decided
here, once, by `is_transient()`. The driver reports a refused login or certificate as "no
host available", like an outage; clusters made here raise `ConnectionSettingError` (exit 2,
one line naming the setting and the server) for those instead.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Sequence
from typing import Any

from cassandra import (
    AuthenticationFailed,
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

from settler import tls
from settler.config import ConfigError, ConnectionSettingError, Settings


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
    elif settings.cql_password:
        raise ConfigError("SETTLER_CQL_PASSWORD is set without SETTLER_CQL_USERNAME")
    ssl_context = None
    if settings.cql_ssl_cafile:
        ssl_context = tls.client_context(
            setting_prefix="SETTLER_CQL_SSL",
            cafile=settings.cql_ssl_cafile,
            certfile=settings.cql_ssl_certfile,
            keyfile=settings.cql_ssl_keyfile,
            check_hostname=settings.cql_ssl_check_hostname,
        )
    elif settings.cql_ssl_certfile or settings.cql_ssl_keyfile:
        raise ConfigError("SETTLER_CQL_SSL_CERTFILE/SETTLER_CQL_SSL_KEYFILE are set without "
                          "SETTLER_CQL_SSL_CAFILE, which is what turns TLS on")
    return SettlerCluster(
        settings,
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


class SettlerCluster(Cluster):  # type: ignore[misc]
    """A driver Cluster whose connect() tells a refused login or certificate (a setting no
    retry fixes) from an unreachable cluster."""

    def __init__(self, settings: Settings, **options: Any) -> None:
        super().__init__(**options)
        self._settler_settings = settings

    def connect(self, *args: Any, **kwargs: Any) -> Session:
        try:
            return super().connect(*args, **kwargs)
        except NoHostAvailable as exc:
            problem = setting_problem(exc, self._settler_settings)
            if problem is not None:
                raise problem from None
            raise


_SERVER_MESSAGE = re.compile(r'message="(?P<message>[^"]*)"')


def setting_problem(exc: NoHostAvailable, settings: Settings) -> ConnectionSettingError | None:
    """The setting behind a failed connect, when a node refused the login or the TLS
    handshake failed on a certificate; None when it may be transient (a node down, or an
    authentication that failed on the server's side, such as an unavailable auth table)."""
    # A session that found no pool to open reports a list of hosts, not errors by host.
    errors = exc.errors if isinstance(exc.errors, dict) else {}
    for endpoint, error in errors.items():
        server = str(endpoint)
        node = f"the CQL server at {server}"
        if isinstance(error, AuthenticationFailed):
            text = str(error)
            if "requires authentication" in text:
                return ConnectionSettingError(
                    "SETTLER_CQL_USERNAME/SETTLER_CQL_PASSWORD", server,
                    f"{node} requires a username and password; none is set")
            # Cassandra: "Provided username X and/or password are incorrect"; ScyllaDB:
            # "Username and/or password are incorrect". The same error code also carries
            # server-side failures (an unavailable auth table), which are transient.
            if "incorrect" in text:
                found = _SERVER_MESSAGE.search(text)
                return ConnectionSettingError(
                    "SETTLER_CQL_USERNAME/SETTLER_CQL_PASSWORD", server,
                    f"{node} refused the login of user {settings.cql_username!r} "
                    f"({found.group('message') if found else 'bad credentials'})")
            continue
        failure = tls.problem(error)
        if failure is not None:
            return _tls_problem(failure, settings, server)
    return None


def _tls_problem(failure: tls.HandshakeFailure, settings: Settings,
                 server: str) -> ConnectionSettingError:
    node = f"the CQL server at {server}"
    if failure.problem is tls.Problem.UNTRUSTED:
        return ConnectionSettingError(
            "SETTLER_CQL_SSL_CAFILE", server,
            f"the certificate of {node} is not signed by a CA in {settings.cql_ssl_cafile} "
            f"({failure.detail})")
    if failure.problem is tls.Problem.NAME_MISMATCH:
        return ConnectionSettingError(
            "SETTLER_CQL_CONTACT_POINTS", server,
            f"the certificate of {node} is not issued for the address the driver connects to "
            f"({failure.detail}); the driver reaches every node by the IP address the "
            "cluster reports, so node certificates need IP entries, or set "
            "SETTLER_CQL_SSL_CHECK_HOSTNAME=false to check the CA chain only")
    if failure.problem is tls.Problem.CLIENT_CERTIFICATE:
        given = settings.cql_ssl_certfile or "none is set"
        return ConnectionSettingError(
            "SETTLER_CQL_SSL_CERTFILE", server,
            f"{node} refused the client certificate ({given}): {failure.detail}")
    return ConnectionSettingError(
        "SETTLER_CQL_SSL_CAFILE", server,
        f"TLS is on (SETTLER_CQL_SSL_CAFILE is set) but {node} does not speak TLS on this "
        f"port ({failure.detail})")


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
        *, timeout: float | None = None, host: Any = None) -> asyncio.Future[Any]:
    """Execute asynchronously; the returned asyncio future resolves to ALL the result rows
    (every page: a caller that assumes one page would silently miss rows). `host`: that
    node as coordinator (its own system tables), instead of the load-balancing policy's."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    options: dict[str, Any] = {} if host is None else {"host": host}
    if timeout is None:
        response = session.execute_async(statement, parameters, **options)
    else:
        response = session.execute_async(statement, parameters, timeout=timeout, **options)
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
