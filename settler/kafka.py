"""Kafka clients built from settings (TLS and SASL included), and the dead-letter record."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.helpers import create_ssl_context

from settler.config import Settings

REASON_HEADER = "settler.reason"
SOURCE_HEADER = "settler.source"
DETAIL_HEADER = "settler.detail"


def security_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=settings.kafka_ssl_cafile,
            certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile,
        )
    if settings.kafka_security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password
    return options


def consumer(settings: Settings, **overrides: Any) -> AIOKafkaConsumer:
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
    return AIOKafkaConsumer(**options)


def producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": "settler",
        "acks": "all",
        "enable_idempotence": True,
        "request_timeout_ms": 15_000,
        **security_options(settings),
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


REBALANCE_TIMEOUT_MS = 60_000
"""How long the group waits for members during a rebalance: longer than the writer's
revoke drain (settler.worker.session.REVOKE_DRAIN_S)."""


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
