"""Configuration: read once at start-up into a typed, frozen `Settings`.

Precedence: built-in defaults < TOML file (`--config`) < `SETTLER_*` environment variables.
Every bad value raises `ConfigError` whose message names the setting, so the CLI can
exit non-zero with one line.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_REGISTRY = Path(__file__).with_name("default_registry.toml")

ENV_PREFIX = "SETTLER_"


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the setting."""


class ConnectionSettingError(ConfigError):
    """A server refused a connection for a reason no retry can fix (a wrong password, an
    untrusted or mismatched certificate): one line naming the setting and the server.

    Not transient by construction, so a retry loop re-raises it and the command exits 2
    within seconds instead of retrying what looks like an outage."""

    def __init__(self, setting: str, server: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.server = server


def _str_list(value: str) -> tuple[str, ...]:
    items = tuple(part.strip() for part in value.split(",") if part.strip())
    if not items:
        raise ValueError("expected a comma-separated list with at least one item")
    return items


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"expected an integer >= 0, got {value!r}")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"expected a port number 0..65535, got {value!r}")
    return number


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return value

    return parse


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


def _optional_str(value: str) -> str | None:
    return value or None


def _existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"no such file: {value}")
    return path


def _auto_or(parse: Callable[[str], int]) -> Callable[[str], int | None]:
    """"auto" (None: derived from the connected database) or a value."""
    def parsed(value: str) -> int | None:
        return None if value.strip().lower() == "auto" else parse(value)

    return parsed


WEAK_CONSISTENCY = ("ANY", "ONE", "LOCAL_ONE", "TWO", "THREE")


def _consistency(value: str) -> str:
    # Rows are written as absolute values computed from what was read: a read that can
    # miss the latest write (with more than one replica) would erase effects.
    if value in WEAK_CONSISTENCY:
        raise ValueError(
            f"{value} does not overlap writes and reads (a re-read row could be stale and "
            "the next absolute write would erase effects); use LOCAL_QUORUM (writers in one "
            "datacenter), QUORUM, EACH_QUORUM or ALL"
        )
    return _choice("QUORUM", "LOCAL_QUORUM", "EACH_QUORUM", "ALL")(value)


def _cql_name(value: str) -> str:
    # Pasted into CQL text (CREATE KEYSPACE ...), so only a plain identifier is allowed.
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,47}", value):
        raise ValueError(f"expected a CQL identifier (letters, digits, _), got {value!r}")
    return value


def _replication(value: str) -> str:
    """`SimpleStrategy:1` or `NetworkTopologyStrategy:dc1=3,dc2=3` -> CQL replication map."""
    strategy, _, params = value.partition(":")
    if strategy == "SimpleStrategy":
        factor = _positive_int(params or "1")
        return f"{{'class': 'SimpleStrategy', 'replication_factor': {factor}}}"
    if strategy == "NetworkTopologyStrategy":
        pairs = []
        for item in _str_list(params):
            dc, _, rf = item.partition("=")
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", dc) or not rf:
                raise ValueError(f"expected dc=factor, got {item!r}")
            pairs.append(f"'{dc}': {_positive_int(rf)}")
        return "{'class': 'NetworkTopologyStrategy', " + ", ".join(pairs) + "}"
    raise ValueError(
        "expected SimpleStrategy:RF or NetworkTopologyStrategy:dc=RF[,dc=RF], "
        f"got {value!r}"
    )


@dataclass(frozen=True)
class Option:
    """One setting: its default (as text, parsed like any other source) and its parser."""

    default: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False


OPTIONS: dict[str, Option] = {
    "kafka_bootstrap": Option("127.0.0.1:9092", _text, "Kafka bootstrap servers"),
    "topics": Option("settlement.events", _str_list, "input topics (comma-separated)"),
    "dlq_topic": Option("settlement.events.dlq", _text, "dead-letter topic"),
    "group_id": Option("settler", _text, "Kafka consumer group"),
    "kafka_security_protocol": Option(
        "PLAINTEXT",
        _choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
        "Kafka security protocol",
    ),
    "kafka_sasl_mechanism": Option(
        "PLAIN", _choice("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"), "Kafka SASL mechanism"
    ),
    "kafka_sasl_username": Option("", _optional_str, "Kafka SASL username"),
    "kafka_sasl_password": Option("", _optional_str, "Kafka SASL password", secret=True),
    "kafka_ssl_cafile": Option("", _optional_str, "CA bundle for Kafka TLS"),
    "kafka_ssl_certfile": Option("", _optional_str, "client certificate for Kafka TLS"),
    "kafka_ssl_keyfile": Option("", _optional_str, "client key for Kafka TLS"),
    "cql_contact_points": Option(
        "127.0.0.1:9042", _str_list, "CQL contact points host:port (comma-separated)"
    ),
    "keyspace": Option("settlement", _cql_name, "keyspace holding balances and trades"),
    "replication": Option(
        "SimpleStrategy:1",
        _replication,
        "keyspace replication: SimpleStrategy:RF or NetworkTopologyStrategy:dc=RF,...",
    ),
    "cql_consistency": Option(
        "LOCAL_QUORUM",
        _consistency,
        "consistency level of every read and write (QUORUM, LOCAL_QUORUM, EACH_QUORUM, ALL:"
        " levels that overlap writes and reads)",
    ),
    "cql_driver": Option(
        "acsylla", _choice("acsylla", "scylla-driver"),
        "driver of the settlement batches: acsylla (C++, a quarter of the CPU per row) or"
        " scylla-driver (every other request uses scylla-driver)",
    ),
    "cql_local_dc": Option("", _optional_str, "local datacenter for DC-aware routing"),
    "cql_username": Option("", _optional_str, "CQL username"),
    "cql_password": Option("", _optional_str, "CQL password", secret=True),
    "cql_ssl_cafile": Option("", _optional_str, "CA bundle for CQL TLS (enables TLS)"),
    "cql_ssl_certfile": Option("", _optional_str, "client certificate for CQL TLS"),
    "cql_ssl_keyfile": Option("", _optional_str, "client key for CQL TLS"),
    "cql_ssl_check_hostname": Option(
        "true", _bool,
        "check that each node's certificate names the IP address the driver connects to"
        " (the driver reaches every node by the address the cluster reports); false: check"
        " the CA chain only",
    ),
    "cql_request_timeout_s": Option("10", _positive_int, "CQL client request timeout (s)"),
    "registry": Option(str(DEFAULT_REGISTRY), _existing_file, "asset registry TOML file"),
    "metrics_host": Option("0.0.0.0", _text, "address of /metrics, /healthz, /readyz"),
    "metrics_port": Option("9108", _port, "port of /metrics, /healthz, /readyz"),
    "api_host": Option("127.0.0.1", _text, "address of the balances HTTP API"),
    "api_port": Option("8080", _port, "port of the balances HTTP API"),
    "max_in_flight": Option("256", _positive_int, "settlement batches in flight at once"),
    "batch_events": Option(
        "32", _positive_int,
        "consecutive events coalesced into one LOGGED batch (1: one batch per event)",
    ),
    "fetch_max_records": Option("2000", _positive_int, "records per Kafka fetch"),
    "commit_interval_ms": Option("500", _positive_int, "offset commit interval (ms)"),
    "balance_cache_rows": Option(
        "200000", _positive_int, "balance rows kept in memory (bounds worker memory)"
    ),
    "recent_ids": Option(
        "500000", _positive_int, "settled event ids remembered for duplicate checks"
    ),
    "lease_ttl_s": Option("10", _positive_int, "single-writer lease lifetime (s)"),
    "takeover_wait_s": Option(
        "auto", _auto_or(_non_negative_int),
        "after taking over from a writer that died, wait this long (renewing the lease)"
        " before reading balances, so its batches still on their way or in the batchlog"
        " land first; auto: the CQL request timeout plus the batchlog's replay bound, 25"
        " for Cassandra (15: replays after 2 x write_request_timeout, checked every 10 s),"
        " 75 for ScyllaDB (65: replays on a 60 s loop); a value below auto is allowed but"
        " logged as a warning",
    ),
    "batch_max_bytes": Option(
        "auto", _auto_or(_positive_int),
        "upper bound of one LOGGED batch (estimated bytes); auto: 80% of the server's"
        " batch_size_fail_threshold (40960 if it cannot be read); a batch the server still"
        " finds too large is split and retried",
    ),
    "kafka_max_request_bytes": Option(
        "1048576", _positive_int,
        "largest request the dead-letter producer sends (Kafka max.request.size); a dead"
        " letter above it goes out without its value, with a pointer to its source",
    ),
    "retry_initial_ms": Option("100", _positive_int, "first retry delay (ms)"),
    "retry_max_ms": Option("5000", _positive_int, "retry delay cap (ms)"),
    "event_loop": Option(
        "auto", _choice("auto", "asyncio", "uvloop"),
        "event loop of the worker: asyncio, uvloop, or auto (uvloop when installed)",
    ),
    "log_level": Option(
        "info", _choice("debug", "info", "warning", "error"), "log level"
    ),
    "log_format": Option(
        "auto", _choice("auto", "json", "console"), "json, console, or auto (console on a tty)"
    ),
}


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str
    topics: tuple[str, ...]
    dlq_topic: str
    group_id: str
    kafka_security_protocol: str
    kafka_sasl_mechanism: str
    kafka_sasl_username: str | None
    kafka_sasl_password: str | None = field(repr=False)  # a secret: see redacted()
    kafka_ssl_cafile: str | None
    kafka_ssl_certfile: str | None
    kafka_ssl_keyfile: str | None
    cql_contact_points: tuple[str, ...]
    keyspace: str
    replication: str
    cql_consistency: str
    cql_driver: str
    cql_local_dc: str | None
    cql_username: str | None
    cql_password: str | None = field(repr=False)  # a secret: see redacted()
    cql_ssl_cafile: str | None
    cql_ssl_certfile: str | None
    cql_ssl_keyfile: str | None
    cql_ssl_check_hostname: bool
    cql_request_timeout_s: int
    registry: Path
    metrics_host: str
    metrics_port: int
    api_host: str
    api_port: int
    max_in_flight: int
    batch_events: int
    fetch_max_records: int
    commit_interval_ms: int
    balance_cache_rows: int
    recent_ids: int
    lease_ttl_s: int
    takeover_wait_s: int | None
    batch_max_bytes: int | None
    kafka_max_request_bytes: int
    retry_initial_ms: int
    retry_max_ms: int
    event_loop: str
    log_level: str
    log_format: str
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def redacted(self) -> dict[str, Any]:
        """Settings for logs: secrets masked."""
        out: dict[str, Any] = {}
        for name, option in OPTIONS.items():
            value = getattr(self, name)
            out[name] = "***" if option.secret and value else (
                str(value) if isinstance(value, Path) else value
            )
        return out


def env_name(option: str) -> str:
    return ENV_PREFIX + option.upper()


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults, then the TOML file, then the environment, then explicit overrides."""
    environ = os.environ if environ is None else environ
    raw: dict[str, str] = {name: option.default for name, option in OPTIONS.items()}
    sources: dict[str, str] = dict.fromkeys(OPTIONS, "default")
    if config_file is not None:
        for name, value in _read_toml(config_file).items():
            raw[name] = value
            sources[name] = str(config_file)
    for name in OPTIONS:
        if env_name(name) in environ:
            raw[name] = environ[env_name(name)]
            sources[name] = env_name(name)
    for name, value in (overrides or {}).items():
        raw[name] = value
        sources[name] = "argument"
    parsed: dict[str, Any] = {}
    for name, option in OPTIONS.items():
        try:
            parsed[name] = option.parse(raw[name])
        except ValueError as exc:
            where = sources[name] if sources[name] != "default" else env_name(name)
            raise ConfigError(f"{where}: invalid {name}: {exc}") from None
    if parsed["dlq_topic"] in parsed["topics"]:
        raise ConfigError(
            f"{env_name('dlq_topic')}: the dead-letter topic {parsed['dlq_topic']!r} is also "
            "an input topic (invalid records would loop)"
        )
    return Settings(**parsed, sources=sources)


def _read_toml(path: Path) -> dict[str, str]:
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    values: dict[str, str] = {}
    for key, value in document.items():
        if key not in OPTIONS:
            raise ConfigError(f"--config: unknown setting {key!r} in {path}")
        if isinstance(value, list):
            values[key] = ",".join(str(item) for item in value)
        elif isinstance(value, bool):
            values[key] = "true" if value else "false"
        else:
            values[key] = str(value)
    return values


def help_table() -> str:
    """Every option with its environment variable and default, for `settler run --help`."""
    lines = []
    for name, option in OPTIONS.items():
        default = option.default if option.default else '""'
        if name == "registry":
            default = "(shipped default_registry.toml)"
        lines.append(f"  {env_name(name):<34} {option.help} [default: {default}]")
    return "\n".join(lines)
