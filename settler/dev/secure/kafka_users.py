"""Kafka's side of the secure mode: the `settler` user's SCRAM-SHA-256/512 credentials,
set through the plain listener with KIP-554's AlterUserScramCredentials (which aiokafka
does not ship, so its wire format is declared here), and a check that a login works.
"""

from __future__ import annotations

import hashlib
import secrets
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

from settler import tls
from settler.dev.secure.material import KAFKA_USER, Material
from settler.dev.services import DevStackError

SCRAM_ITERATIONS = 4096  # Kafka's minimum; the dev stack wants a fast login
SCRAM_MECHANISMS = {"SCRAM-SHA-256": (1, "sha256"), "SCRAM-SHA-512": (2, "sha512")}


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
