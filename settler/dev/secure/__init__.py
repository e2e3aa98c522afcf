"""Secure mode of the dev stack (`settler dev up --secure`): what it is configured with.

A throw-away CA, the servers' and a client's certificates and generated passwords
(`certificates`, `material`: openssl at set-up, under `.stack/secure/`, never checked in);
Kafka's SASL_SSL and mutual-TLS listeners and the second Cassandra's TLS + password
configuration (`configs`); and the users both servers get at start-up (`kafka_users`,
`cassandra_roles`). settler.dev.stack starts and stops the processes.
"""

from __future__ import annotations

from settler.dev.secure.cassandra_roles import (
    cql_answers,
    cql_release_version,
    ensure_cassandra_roles,
)
from settler.dev.secure.certificates import (
    CERT_DAYS,
    ensure_material,
    make_ca,
    make_certificates,
)
from settler.dev.secure.configs import cassandra_yaml, kafka_properties
from settler.dev.secure.kafka_users import (
    SCRAM_ITERATIONS,
    SCRAM_MECHANISMS,
    AlterUserScramCredentials,
    ensure_kafka_users,
    kafka_login_works,
    salted_password,
)
from settler.dev.secure.material import (
    CQL_ADMIN,
    CQL_USER,
    KAFKA_MODES,
    KAFKA_USER,
    Material,
    load_material,
    secure_dir,
    write_settings_file,
)
from settler.dev.services import SecurePorts

__all__ = [
    "CERT_DAYS",
    "CQL_ADMIN",
    "CQL_USER",
    "KAFKA_MODES",
    "KAFKA_USER",
    "SCRAM_ITERATIONS",
    "SCRAM_MECHANISMS",
    "AlterUserScramCredentials",
    "Material",
    "SecurePorts",
    "cassandra_yaml",
    "cql_answers",
    "cql_release_version",
    "ensure_cassandra_roles",
    "ensure_kafka_users",
    "ensure_material",
    "kafka_login_works",
    "kafka_properties",
    "load_material",
    "make_ca",
    "make_certificates",
    "salted_password",
    "secure_dir",
    "write_settings_file",
]
