"""Secure mode of the dev stack (`settler dev up --secure`): what it is configured with.

A throw-away CA, the servers' and a client's certificates and generated passwords (openssl,
at set-up, under `.stack/secure/`, never checked in); Kafka's SASL_SSL and mutual-TLS
listeners; the second Cassandra's TLS + password configuration; and the users both servers
get at start-up. settler.dev.stack starts and stops the processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any, TypeAlias

from aiokafka.client import AIOKafkaClient
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactBytes,
    CompactString,
    Int8,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)
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
from settler.dev.stack import DevStackError, deploy_dir, stack_dir

KAFKA_USER = "settler"
CQL_USER = "settler"
CQL_ADMIN = "settler_admin"
_DEFAULT_SUPERUSER = ("cassandra", "cassandra")  # what Cassandra creates on first start
CERT_DAYS = 30
SCRAM_ITERATIONS = 4096  # Kafka's minimum; the dev stack wants a fast login
SCRAM_MECHANISMS = {"SCRAM-SHA-256": (1, "sha256"), "SCRAM-SHA-512": (2, "sha512")}

KAFKA_MODES = ("scram", "plain", "mtls")


@dataclass(frozen=True)
class SecurePorts:
    """Where the secure listeners are (all on 127.0.0.1)."""

    kafka_sasl_ssl: int
    kafka_ssl: int
    cql: int


@dataclass(frozen=True)
class Material:
    """The secure mode's certificates, keys and passwords, as files under `directory`."""

    directory: Path
    # Kept out of repr: a failing test or a traceback prints the objects it holds.
    kafka_password: str = field(repr=False)
    cql_password: str = field(repr=False)
    admin_password: str = field(repr=False)
    keystore_password: str = field(repr=False)

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def keystore(self) -> Path:
        """The servers' certificate and key as PKCS#12 (Kafka and Cassandra read it)."""
        return self.directory / "server.p12"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    @property
    def settings_file(self) -> Path:
        """A settler TOML config for the secure paths: `settler --config <it> run`."""
        return self.directory / "settler.toml"

    def secrets(self) -> dict[str, str]:
        """Every secret no output may show, by name: the passwords and the private keys
        (their base64 bodies)."""
        return {
            "kafka password": self.kafka_password,
            "cql password": self.cql_password,
            "cql admin password": self.admin_password,
            "keystore password": self.keystore_password,
            **{f"private key {path.name}": _pem_body(path)
               for path in (self.ca_key, self.server_key, self.client_key)},
        }

    def settler_environ(self, ports: SecurePorts, *, kafka: str = "scram") -> dict[str, str]:
        """SETTLER_* variables for the secure paths: Kafka over SASL_SSL with SCRAM-SHA-512
        (`scram`) or PLAIN (`plain`), or over TLS with a client certificate (`mtls`); CQL
        over TLS with the `settler` role's password."""
        if kafka not in KAFKA_MODES:
            raise ValueError(f"kafka must be one of {KAFKA_MODES}, got {kafka!r}")
        if kafka == "mtls":
            environ = {
                "SETTLER_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports.kafka_ssl}",
                "SETTLER_KAFKA_SECURITY_PROTOCOL": "SSL",
                "SETTLER_KAFKA_SSL_CAFILE": str(self.ca_file),
                "SETTLER_KAFKA_SSL_CERTFILE": str(self.client_cert),
                "SETTLER_KAFKA_SSL_KEYFILE": str(self.client_key),
            }
        else:
            environ = {
                "SETTLER_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports.kafka_sasl_ssl}",
                "SETTLER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "SETTLER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512" if kafka == "scram" else "PLAIN",
                "SETTLER_KAFKA_SASL_USERNAME": KAFKA_USER,
                "SETTLER_KAFKA_SASL_PASSWORD": self.kafka_password,
                "SETTLER_KAFKA_SSL_CAFILE": str(self.ca_file),
            }
        return {
            **environ,
            "SETTLER_CQL_CONTACT_POINTS": f"127.0.0.1:{ports.cql}",
            "SETTLER_CQL_USERNAME": CQL_USER,
            "SETTLER_CQL_PASSWORD": self.cql_password,
            "SETTLER_CQL_SSL_CAFILE": str(self.ca_file),
        }


def secure_dir() -> Path:
    return stack_dir() / "secure"


def _pem_body(path: Path) -> str:
    lines = [line for line in path.read_text().splitlines() if line and "-----" not in line]
    return "".join(lines)


# --------------------------------------------------------------------------- material


_CREDENTIALS = "credentials.json"

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = settler dev
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
# 127.0.0.1 only: a client that connects by any other name must fail the hostname check.
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def load_material(directory: Path | None = None) -> Material | None:
    """The material `ensure_material` made, or None when there is none (or it is partial)."""
    directory = directory or secure_dir()
    try:
        stored = json.loads((directory / _CREDENTIALS).read_text())
        material = Material(directory=directory, **stored)
    except (OSError, ValueError, TypeError):
        return None
    files = (material.ca_file, material.server_cert, material.keystore, material.client_cert,
             material.client_key)
    return material if all(path.is_file() for path in files) else None


def ensure_material(directory: Path | None = None) -> tuple[Material, bool]:
    """The secure mode's material, made now (CA, certificates, passwords) unless it exists.
    Returns it and whether it was made now."""
    directory = directory or secure_dir()
    existing = load_material(directory)
    if existing is not None:
        return existing, False
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    material = Material(
        directory=directory,
        kafka_password=secrets.token_urlsafe(18),
        cql_password=secrets.token_urlsafe(18),
        admin_password=secrets.token_urlsafe(18),
        keystore_password=secrets.token_urlsafe(18),
    )
    make_certificates(material)
    _write_private(directory / _CREDENTIALS, json.dumps({
        "kafka_password": material.kafka_password,
        "cql_password": material.cql_password,
        "admin_password": material.admin_password,
        "keystore_password": material.keystore_password,
    }, indent=2) + "\n")
    return material, True


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A new self-signed CA (`ca.pem`, `ca.key`) in `directory`: also what tests use as a CA
    the servers' certificates do not lead to."""
    directory.mkdir(parents=True, exist_ok=True)
    config = _openssl_config(directory)
    cert, key = directory / "ca.pem", directory / "ca.key"
    _openssl("req", "-x509", "-new", *_new_key(key), "-out", str(cert),
             "-days", str(CERT_DAYS), "-subj", f"/O=settler dev stack/CN={name}",
             "-config", str(config), "-extensions", "ca")
    return cert, key


def make_certificates(material: Material) -> None:
    """CA, server certificate (IP:127.0.0.1) with its PKCS#12 keystore, client certificate."""
    directory = material.directory
    make_ca(directory, f"settler dev CA {secrets.token_hex(4)}")
    _signed(material, "server", "/CN=127.0.0.1", material.server_cert, material.server_key)
    _signed(material, "client", "/CN=settler-client", material.client_cert, material.client_key)
    _openssl("pkcs12", "-export", "-in", str(material.server_cert),
             "-inkey", str(material.server_key), "-certfile", str(material.ca_file),
             "-name", "server", "-out", str(material.keystore),
             "-passout", "env:SETTLER_DEV_KEYSTORE_PASSWORD",
             env={"SETTLER_DEV_KEYSTORE_PASSWORD": material.keystore_password})
    for path in directory.iterdir():
        if path.suffix in (".key", ".p12"):
            path.chmod(0o600)
    for leftover in directory.glob("*.csr"):
        leftover.unlink()


def _signed(material: Material, extensions: str, subject: str, cert: Path, key: Path) -> None:
    csr = cert.with_suffix(".csr")
    config = _openssl_config(material.directory)
    _openssl("req", "-new", *_new_key(key), "-out", str(csr), "-subj", subject,
             "-config", str(config))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(material.ca_file),
             "-CAkey", str(material.ca_key), "-set_serial", f"0x{secrets.token_hex(16)}",
             "-days", str(CERT_DAYS), "-out", str(cert), "-extfile", str(config),
             "-extensions", extensions)


def _new_key(key: Path) -> list[str]:
    # P-256: quick to make, and every TLS stack here (Java 17, OpenSSL) speaks ECDSA.
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key)]


def _openssl_config(directory: Path) -> Path:
    path = directory / "openssl.cnf"
    if not path.exists():
        path.write_text(_OPENSSL_CONFIG)
    return path


def _openssl(*args: str, env: dict[str, str] | None = None) -> None:
    try:
        result = subprocess.run(
            ["openssl", *args], capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, **(env or {})},
        )
    except FileNotFoundError:
        raise DevStackError("openssl is not on PATH: the secure dev stack needs it") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DevStackError(f"openssl {args[0]} failed (exit {result.returncode}): {last}")


def _write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


def _substitutions(material: Material) -> dict[str, str]:
    return {
        "ca_file": str(material.ca_file),
        "keystore": str(material.keystore),
        "keystore_password": material.keystore_password,
        "kafka_user": KAFKA_USER,
        "kafka_password": material.kafka_password,
        "cql_user": CQL_USER,
        "admin_user": CQL_ADMIN,
    }


def write_settings_file(material: Material, ports: SecurePorts) -> Path:
    """`.stack/secure/settler.toml`: settler's settings for the secure paths (SASL_SSL +
    SCRAM-SHA-512, CQL TLS + password), readable by its owner only."""
    environ = material.settler_environ(ports, kafka="scram")
    lines = ["# settler's settings for `settler dev up --secure` (generated; holds passwords).",
             f"# Use: settler --config {material.settings_file} run"]
    for variable, value in environ.items():
        name = variable.removeprefix("SETTLER_").lower()
        lines.append(f"{name} = {json.dumps(value)}")
    _write_private(material.settings_file, "\n".join(lines) + "\n")
    return material.settings_file


# --------------------------------------------------------------------------- kafka


def kafka_properties(material: Material) -> str:
    """The secure listeners' broker settings (deploy/local/kafka/secure.properties, filled)."""
    template = (deploy_dir() / "kafka" / "secure.properties").read_text()
    return Template(template).substitute(_substitutions(material))


def salted_password(digest: str, password: str, salt: bytes, iterations: int) -> bytes:
    """RFC 5802's SaltedPassword = Hi(password, salt, i), which is PBKDF2 with the
    mechanism's HMAC: what the broker stores (with the salt) instead of the password."""
    return hashlib.pbkdf2_hmac(digest, password.encode(), salt, iterations)


def _scram_upserts(password: str) -> list[tuple[Any, ...]]:
    upserts: list[tuple[Any, ...]] = []
    for mechanism_id, digest in SCRAM_MECHANISMS.values():
        salt = secrets.token_bytes(32)
        salted = salted_password(digest, password, salt, SCRAM_ITERATIONS)
        upserts.append((KAFKA_USER, mechanism_id, SCRAM_ITERATIONS, salt, salted, {}))
    return upserts


async def ensure_kafka_users(plain_bootstrap: str, material: Material) -> None:
    """Create (or reset) the SCRAM-SHA-256/512 credentials of the `settler` user, through
    the plain listener (which needs none)."""
    client = AIOKafkaClient(bootstrap_servers=plain_bootstrap, request_timeout_ms=10_000)
    await client.bootstrap()
    try:
        node = next(iter(client.cluster.brokers())).nodeId
        # One mechanism per request: Kafka refuses two changes to one user in a request.
        for upsert in _scram_upserts(material.kafka_password):
            response = await client.send(node, AlterUserScramCredentials(
                deletions=[], upsertions=[upsert]))
            for user, error_code, error_message, _tags in response.results:
                if error_code:
                    raise DevStackError(f"Kafka refused the SCRAM credentials of {user!r}: "
                                        f"error {error_code} {error_message or ''}".strip())
    finally:
        await client.close()


class _AlterUserScramCredentialsResponse(Response):  # type: ignore[misc]
    API_KEY = 51
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("results", CompactArray(
            ("user", CompactString("utf-8")),
            ("error_code", Int16),
            ("error_message", CompactString("utf-8")),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


class _AlterUserScramCredentials_v0(RequestStruct):  # type: ignore[misc]
    """KIP-554's AlterUserScramCredentials, which aiokafka does not ship."""

    FLEXIBLE_VERSION = True
    API_KEY = 51
    API_VERSION = 0
    RESPONSE_TYPE = _AlterUserScramCredentialsResponse
    SCHEMA = Schema(
        ("deletions", CompactArray(
            ("name", CompactString("utf-8")),
            ("mechanism", Int8),
            ("tags", TaggedFields),
        )),
        ("upsertions", CompactArray(
            ("name", CompactString("utf-8")),
            ("mechanism", Int8),
            ("iterations", Int32),
            ("salt", CompactBytes),
            ("salted_password", CompactBytes),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


_AlterUserScramCredentialsStruct: TypeAlias = _AlterUserScramCredentials_v0


class AlterUserScramCredentials(Request[_AlterUserScramCredentialsStruct]):  # type: ignore[misc]
    API_KEY = 51

    def __init__(self, deletions: list[tuple[Any, ...]],
                 upsertions: list[tuple[Any, ...]]) -> None:
        self._deletions = deletions
        self._upsertions = upsertions

    def build(self, struct_class: type[_AlterUserScramCredentialsStruct]) -> Any:
        return struct_class(self._deletions, self._upsertions, {})


async def kafka_login_works(port: int, material: Material) -> bool:
    """Whether a SCRAM-SHA-512 login over SASL_SSL on `port` succeeds now."""
    context = tls.client_context(setting_prefix="SETTLER_KAFKA_SSL",
                                 cafile=str(material.ca_file), certfile=None, keyfile=None)
    try:
        conn = await create_conn(
            "127.0.0.1", port, ssl_context=context, security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512", sasl_plain_username=KAFKA_USER,
            sasl_plain_password=material.kafka_password, request_timeout_ms=5000,
        )
    except (KafkaError, OSError, TimeoutError):
        return False
    conn.close()
    return True


# --------------------------------------------------------------------------- cassandra


def cassandra_yaml(material: Material) -> str:
    """deploy/local/cassandra/cassandra.yaml with the top-level keys of secure.yaml
    replaced by secure.yaml's (filled in)."""
    base = (deploy_dir() / "cassandra" / "cassandra.yaml").read_text()
    overrides = Template((deploy_dir() / "cassandra" / "secure.yaml").read_text()).substitute(
        _substitutions(material))
    replaced = set(re.findall(r"^([A-Za-z_]+):", overrides, flags=re.MULTILINE))
    kept: list[str] = []
    skipping = False
    for line in base.splitlines():
        top_level = re.match(r"^([A-Za-z_]+):", line)
        if top_level:
            skipping = top_level.group(1) in replaced
        elif line and not line[0].isspace():
            skipping = False  # a comment at column 0 ends the block before it
        if not skipping:
            kept.append(line)
    return "\n".join(kept) + "\n\n# ---- settler dev up --secure\n" + overrides


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
