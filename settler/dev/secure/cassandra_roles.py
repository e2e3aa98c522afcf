"""The secure Cassandra's side: logging in over TLS, telling "answers" from "accepts our
admin", and the roles it gets at start-up (`settler_admin` replaces the default superuser,
`settler` is the worker's login).
"""

from __future__ import annotations

import time

from cassandra import AuthenticationFailed, DriverException
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
)
from cassandra.io.asyncioreactor import AsyncioConnection
from cassandra.policies import WhiteListRoundRobinPolicy

from settler import tls
from settler.dev.paths import stack_dir
from settler.dev.secure.material import CQL_ADMIN, CQL_USER, Material
from settler.dev.services import DevStackError

_DEFAULT_SUPERUSER = ("cassandra", "cassandra")  # what Cassandra creates on first start


def _cql_cluster(port: int, material: Material, user: str | None, password: str | None,
                 timeout_s: float) -> Cluster:
    context = tls.client_context(setting_prefix="SETTLER_CQL_SSL",
                                 cafile=str(material.ca_file), certfile=None, keyfile=None)
    profile = ExecutionProfile(
        load_balancing_policy=WhiteListRoundRobinPolicy(["127.0.0.1"]), request_timeout=timeout_s
    )
    return Cluster(
        ["127.0.0.1"], port=port, protocol_version=5, connection_class=AsyncioConnection,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile}, ssl_context=context,
        auth_provider=PlainTextAuthProvider(user, password) if user else None,
        connect_timeout=timeout_s, control_connection_timeout=timeout_s,
    )


def _cql_run(port: int, material: Material, user: str, password: str,
             statements: list[str], timeout_s: float = 10.0) -> str:
    """Log in as `user`, run `statements`, return the node's release_version."""
    cluster = _cql_cluster(port, material, user, password, timeout_s)
    try:
        session = cluster.connect()
        for statement in statements:
            session.execute(statement, timeout=timeout_s)
        row = session.execute("SELECT release_version FROM system.local").one()
        return str(row.release_version) if row is not None else "unknown"
    finally:
        cluster.shutdown()


def _errors(exc: BaseException) -> list[BaseException]:
    """The per-host errors of a failed connect (NoHostAvailable may hold a host list)."""
    if isinstance(exc, NoHostAvailable):
        return list(exc.errors.values()) if isinstance(exc.errors, dict) else []
    return [exc]


def _bad_credentials(exc: BaseException) -> bool:
    return any(isinstance(error, AuthenticationFailed) and "incorrect" in str(error)
               for error in _errors(exc))


def cql_release_version(port: int, material: Material, timeout_s: float = 5.0) -> str | None:
    """`release_version` of the secure node over TLS as the admin role, or None when it does
    not answer (or the admin role does not exist yet)."""
    try:
        return _cql_run(port, material, CQL_ADMIN, material.admin_password, [], timeout_s)
    except (DriverException, NoHostAvailable, OSError):
        return None


def cql_answers(port: int, material: Material, timeout_s: float = 5.0) -> bool:
    """Whether the secure node speaks CQL over TLS: it asks for credentials, which is enough
    (the roles may not exist yet)."""
    cluster = _cql_cluster(port, material, None, None, timeout_s)
    try:
        cluster.connect()
    except NoHostAvailable as exc:
        return any(isinstance(error, AuthenticationFailed) for error in _errors(exc))
    except (DriverException, OSError):
        return False
    else:
        return True  # no authentication at all: answers, but not as configured
    finally:
        cluster.shutdown()


def ensure_cassandra_roles(port: int, material: Material, timeout_s: float = 90.0) -> str:
    """Make `settler_admin` the superuser (dropping the default `cassandra`) and create the
    `settler` login role; idempotent. Returns the node's release_version."""
    deadline = time.monotonic() + timeout_s
    app_role = (f"CREATE ROLE IF NOT EXISTS {CQL_USER} WITH PASSWORD = "
                f"'{material.cql_password}' AND LOGIN = true AND SUPERUSER = false")
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            return _cql_run(port, material, CQL_ADMIN, material.admin_password,
                            [f"DROP ROLE IF EXISTS {_DEFAULT_SUPERUSER[0]}", app_role])
        except (DriverException, NoHostAvailable, OSError) as exc:
            last = exc
            if not _bad_credentials(exc):
                time.sleep(1.0)  # starting up, or the default role not created yet
                continue
        try:  # first start: only the default superuser exists
            _cql_run(port, material, *_DEFAULT_SUPERUSER, [
                f"CREATE ROLE IF NOT EXISTS {CQL_ADMIN} WITH PASSWORD = "
                f"'{material.admin_password}' AND SUPERUSER = true AND LOGIN = true"])
        except (DriverException, NoHostAvailable, OSError) as exc:
            last = exc
            if _bad_credentials(exc):
                raise DevStackError(
                    "the secure Cassandra knows neither its admin role nor the default "
                    f"superuser: its data ({stack_dir() / 'cassandra-secure'}) belongs to "
                    "other credentials; run `settler dev down` and delete that directory"
                ) from None
            time.sleep(1.0)
    raise DevStackError(f"could not set up the roles of the secure Cassandra within "
                        f"{timeout_s:.0f}s: {type(last).__name__}: {last}")
