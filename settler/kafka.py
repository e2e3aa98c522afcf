"""Kafka clients built from settings (TLS and SASL included), what a refused connection
means, and the dead-letter record.

aiokafka logs a refused bootstrap and raises a bare "Unable to bootstrap", which a retry loop
takes for an outage and retries forever. The clients made here re-connect once to each
bootstrap server when start() fails that way, and raise `ConnectionSettingError` (exit 2,
one line naming the setting and the broker) when the broker refused the settings: a wrong
password, an untrusted or mismatched certificate, a refused client certificate, a security
protocol the listener does not speak. `is_transient` is the retry predicate to use.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.protocol.metadata import MetadataRequest

from settler import tls
from settler.config import ConfigError, ConnectionSettingError, Settings
from settler.timeouts import within

REASON_HEADER = "settler.reason"
SOURCE_HEADER = "settler.source"
DETAIL_HEADER = "settler.detail"

DIAGNOSE_TIMEOUT_S = 10.0
"""A diagnosis connection is given this long per bootstrap server."""

_NOT_TRANSIENT: tuple[type[BaseException], ...] = (
    ConfigError,
    SaslAuthenticationFailed,
    AuthenticationFailedError,
    UnsupportedSaslMechanismError,
    IllegalSaslStateError,
)

_SSL = ("SSL", "SASL_SSL")


def is_transient(exc: BaseException) -> bool:
    """Broker down, timeouts, lost connections: retry. A refused login or a setting: never."""
    if isinstance(exc, _NOT_TRANSIENT):
        return False
    return isinstance(exc, KafkaError | ConnectionError | TimeoutError)


def security_options(settings: Settings) -> dict[str, Any]:
    """aiokafka's security keyword arguments; a contradictory combination is a ConfigError."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    tls_files = {"CAFILE": settings.kafka_ssl_cafile, "CERTFILE": settings.kafka_ssl_certfile,
                 "KEYFILE": settings.kafka_ssl_keyfile}
    if protocol in _SSL:
        options["ssl_context"] = tls.client_context(
            setting_prefix="SETTLER_KAFKA_SSL",
            cafile=settings.kafka_ssl_cafile,
            certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile,
        )
    elif set_files := [name for name, value in tls_files.items() if value]:
        raise ConfigError(
            f"SETTLER_KAFKA_SSL_{set_files[0]} is set but SETTLER_KAFKA_SECURITY_PROTOCOL is "
            f"{protocol}: TLS is used only with SSL or SASL_SSL")
    if protocol.startswith("SASL"):
        if not settings.kafka_sasl_username or not settings.kafka_sasl_password:
            raise ConfigError(
                "SETTLER_KAFKA_SASL_USERNAME and SETTLER_KAFKA_SASL_PASSWORD: both are needed "
                f"with SETTLER_KAFKA_SECURITY_PROTOCOL={protocol}")
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password
    return options


class _Diagnosing:
    """start() that, when aiokafka could not bootstrap, finds out whether the broker refused
    the settings (ConnectionSettingError) or was only unreachable (the original error)."""

    _settler_settings: Settings

    async def start(self) -> None:
        try:
            await super().start()  # type: ignore[misc]
        except KafkaConnectionError:
            problem = await diagnose(self._settler_settings)
            if problem is not None:
                # Nobody retries this client: release it here, since callers that start a
                # client outside their try/finally would leave it to the garbage collector.
                # The refusal is what the caller must see, not an error of stopping.
                await stop_quietly(self, DIAGNOSE_TIMEOUT_S)  # type: ignore[arg-type]
                raise problem from None
            raise


class Consumer(_Diagnosing, AIOKafkaConsumer):  # type: ignore[misc]
    def __init__(self, settings: Settings, **options: Any) -> None:
        super().__init__(**options)
        self._settler_settings = settings


class Producer(_Diagnosing, AIOKafkaProducer):  # type: ignore[misc]
    def __init__(self, settings: Settings, **options: Any) -> None:
        super().__init__(**options)
        self._settler_settings = settings


class Admin(_Diagnosing, AIOKafkaAdminClient):  # type: ignore[misc]
    def __init__(self, settings: Settings, **options: Any) -> None:
        super().__init__(**options)
        self._settler_settings = settings

    async def _stop(self) -> None:
        await self.close()


def consumer(settings: Settings, **overrides: Any) -> Consumer:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "group_id": settings.group_id,
        "client_id": "settler",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        # A database outage stalls the loop; it must not cost the partitions.
        "max_poll_interval_ms": 30 * 60 * 1000,
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 3_000,
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
        **security_options(settings),
    }
    options.update(overrides)
    return Consumer(settings, **options)


def producer(settings: Settings, **overrides: Any) -> Producer:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": "settler",
        "acks": "all",
        "enable_idempotence": True,
        "request_timeout_ms": 15_000,
        **security_options(settings),
    }
    options.update(overrides)
    return Producer(settings, **options)


def admin(settings: Settings, **overrides: Any) -> Admin:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": "settler",
        **security_options(settings),
    }
    options.update(overrides)
    return Admin(settings, **options)


# --------------------------------------------------------------------------- diagnosis


def _servers(settings: Settings) -> list[tuple[str, int]]:
    servers: list[tuple[str, int]] = []
    for item in settings.kafka_bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"SETTLER_KAFKA_BOOTSTRAP: expected host:port, got {item!r}")
        servers.append((host.strip("[]"), int(port)))
    return servers


async def check(settings: Settings) -> None:
    """Connect to the bootstrap servers as the clients would: returns when one accepts the
    settings and answers; raises ConnectionSettingError when a broker refuses them, or
    KafkaConnectionError when none could be reached (transient)."""
    problem = await diagnose(settings, require_answer=True)
    if problem is not None:
        raise problem


async def diagnose(settings: Settings, *, require_answer: bool = False
                   ) -> ConnectionSettingError | None:
    """Connect once to each bootstrap server (TLS handshake, SASL login, one metadata
    request) and return the first refusal that is the settings' fault, or None. With
    `require_answer`, no server answering at all is a KafkaConnectionError."""
    options = security_options(settings)
    answered = False
    for host, port in _servers(settings):
        server = f"{host}:{port}"
        try:
            conn = await within(DIAGNOSE_TIMEOUT_S, create_conn(
                host, port, client_id="settler-check",
                request_timeout_ms=int(DIAGNOSE_TIMEOUT_S * 1000), **options,
            ))
        except (KafkaError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            problem = setting_problem(exc, settings, server)
            if problem is not None:
                return problem
            continue
        try:
            await conn.send(MetadataRequest([]))
        except (KafkaError, OSError, TimeoutError) as exc:
            problem = setting_problem(exc, settings, server)
            if problem is not None:
                return problem
            continue
        finally:
            conn.close()
        answered = True
    if require_answer and not answered:
        raise KafkaConnectionError(f"no Kafka broker answered at {settings.kafka_bootstrap}")
    return None


def setting_problem(exc: BaseException, settings: Settings, server: str
                    ) -> ConnectionSettingError | None:
    """The ConnectionSettingError a connection failure to `server` amounts to, or None when
    it may be transient. Only failures that repeat identically on every attempt count (an
    SSL client on a SASL_SSL listener, which the broker just disconnects, is not told apart
    from a broker going down)."""
    protocol = settings.kafka_security_protocol
    mechanism = settings.kafka_sasl_mechanism
    broker = f"the Kafka broker at {server}"
    if isinstance(exc, SaslAuthenticationFailed):
        return ConnectionSettingError(
            "SETTLER_KAFKA_SASL_USERNAME/SETTLER_KAFKA_SASL_PASSWORD", server,
            f"{broker} refused the {mechanism} login of user "
            f"{settings.kafka_sasl_username!r} ({_broker_message(exc)})")
    if isinstance(exc, UnsupportedSaslMechanismError):
        return ConnectionSettingError(
            "SETTLER_KAFKA_SASL_MECHANISM", server,
            f"{broker} does not offer {mechanism} on this listener ({_broker_message(exc)})")
    if isinstance(exc, IllegalSaslStateError):
        return ConnectionSettingError(
            "SETTLER_KAFKA_SECURITY_PROTOCOL", server,
            f"{broker} takes no SASL login on this listener (the setting is {protocol}; "
            "an SSL or PLAINTEXT listener?)")
    failure = tls.problem(exc)
    if failure is not None:
        return _tls_problem(failure, settings, server)
    if _tls_record_received(exc) and protocol not in _SSL:
        return ConnectionSettingError(
            "SETTLER_KAFKA_SECURITY_PROTOCOL", server,
            f"{broker} speaks TLS on this port but the setting is {protocol} "
            "(use SSL or SASL_SSL)")
    return None


def _tls_problem(failure: tls.HandshakeFailure, settings: Settings,
                 server: str) -> ConnectionSettingError:
    host = server.rpartition(":")[0]
    broker = f"the Kafka broker at {server}"
    if failure.problem is tls.Problem.UNTRUSTED:
        trusted = settings.kafka_ssl_cafile or "the system's trusted CAs"
        return ConnectionSettingError(
            "SETTLER_KAFKA_SSL_CAFILE", server,
            f"the certificate of {broker} is not signed by a CA in {trusted} "
            f"({failure.detail})")
    if failure.problem is tls.Problem.NAME_MISMATCH:
        return ConnectionSettingError(
            "SETTLER_KAFKA_BOOTSTRAP", server,
            f"the certificate of {broker} is not issued for {host!r} ({failure.detail}): "
            "connect by a name the certificate holds")
    if failure.problem is tls.Problem.CLIENT_CERTIFICATE:
        given = settings.kafka_ssl_certfile or "none is set"
        return ConnectionSettingError(
            "SETTLER_KAFKA_SSL_CERTFILE", server,
            f"{broker} refused the client certificate ({given}): {failure.detail}")
    return ConnectionSettingError(
        "SETTLER_KAFKA_SECURITY_PROTOCOL", server,
        f"{broker} does not speak TLS on this port but the setting is "
        f"{settings.kafka_security_protocol} ({failure.detail})")


def _broker_message(exc: KafkaError) -> str:
    text = str(exc)
    # "[Error 58] SaslAuthenticationFailed: Authentication failed: ..." -> the broker's words
    return text.split(": ", 1)[1] if ": " in text else text


def _tls_record_received(exc: BaseException) -> bool:
    """Whether a plaintext client read a TLS record header (0x15/0x16 0x03 ..) where a Kafka
    response size was expected: the port speaks TLS."""
    current: BaseException | None = exc
    for _ in range(5):
        if current is None:
            return False
        if isinstance(current, asyncio.IncompleteReadError) and current.expected:
            size = current.expected
            return (size >> 24) in (0x15, 0x16) and (size >> 16) & 0xFF == 0x03
        current = current.__cause__ or current.__context__
    return False


# --------------------------------------------------------------------------- dead letters


REBALANCE_TIMEOUT_MS = 60_000
"""How long the group waits for members during a rebalance: longer than the writer's
revoke drain (settler.worker.rebalance.REVOKE_DRAIN_S)."""


def transactional_id(settings: Settings) -> str:
    """One id for the writer role of a keyspace and group: a new writer's producer
    fences every former writer's (Kafka refuses their transactions)."""
    return f"settler.{settings.keyspace}.{settings.group_id}"


def writer_consumer(settings: Settings) -> AIOKafkaConsumer:
    return consumer(settings, rebalance_timeout_ms=REBALANCE_TIMEOUT_MS)


def writer_producer(settings: Settings) -> AIOKafkaProducer:
    """Transactional: dead letters and the group's offsets are committed together."""
    return producer(settings, transactional_id=transactional_id(settings),
                    max_request_size=settings.kafka_max_request_bytes)


def dead_letter_headers(original: Any, reason: str, source: str, detail: str
                        ) -> list[tuple[str, bytes]]:
    """The original headers plus why and where from (SPEC §4)."""
    headers = [(key, value) for key, value in (original or ()) if not key.startswith("settler.")]
    headers += [
        (REASON_HEADER, reason.encode()),
        (SOURCE_HEADER, source.encode()),
        (DETAIL_HEADER, detail[:1000].encode()),
    ]
    return headers


class Stoppable(Protocol):
    async def stop(self) -> None: ...


async def stop_quietly(client: Stoppable | None, timeout_s: float) -> None:
    """Stop an aiokafka client within `timeout_s`, whatever stopping raises: aiokafka may
    re-raise the CancelledError of one of its own internal tasks on stop, and a client
    being closed has nothing more to say."""
    if client is not None:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await within(timeout_s, client.stop())
