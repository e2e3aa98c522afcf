"""`settler schema apply`: create the keyspace and tables from schema/*.cql, idempotently."""

from __future__ import annotations

import os
from pathlib import Path

from settler.config import Settings
from settler.store import cql


def schema_dir() -> Path:
    """schema/ beside the package (a source checkout or the Docker image's /app)."""
    override = os.environ.get("SETTLER_SCHEMA_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "schema"


def schema_statements(settings: Settings) -> list[str]:
    statements: list[str] = []
    for path in sorted(schema_dir().glob("*.cql")):
        text = "\n".join(
            line for line in path.read_text().splitlines() if not line.lstrip().startswith("--")
        )
        text = text.replace("{keyspace}", settings.keyspace).replace(
            "{replication}", settings.replication
        )
        statements.extend(part.strip() for part in text.split(";") if part.strip())
    if not statements:
        raise FileNotFoundError(f"no schema files in {schema_dir()}")
    return statements


def apply_schema(settings: Settings) -> list[str]:
    """Run every CREATE ... IF NOT EXISTS statement; returns them (blocking call)."""
    statements = schema_statements(settings)
    cluster, session = cql.connect(settings)
    try:
        # Each DDL statement returns only once the cluster agrees on the new schema (the
        # driver waits on its control connection), so no extra wait is needed.
        for statement in statements:
            session.execute(statement, timeout=60)
    finally:
        cluster.shutdown()
    return statements


def drop_keyspace(settings: Settings) -> None:
    """For tests and benchmarks that create a keyspace of their own."""
    cluster, session = cql.connect(settings)
    try:
        session.execute(f"DROP KEYSPACE IF EXISTS {settings.keyspace}", timeout=60)
    finally:
        cluster.shutdown()
