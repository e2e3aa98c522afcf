"""SPEC section 7: settings from defaults < TOML file < SETTLER_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from settler.config import (
    DEFAULT_REGISTRY,
    OPTIONS,
    ConfigError,
    env_name,
    help_table,
    load_settings,
)

NO_ENVIRONMENT: dict[str, str] = {}


def toml_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settler.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("kafka_bootstrap", "127.0.0.1:9092"),
        ("topics", ("settlement.events",)),
        ("dlq_topic", "settlement.events.dlq"),
        ("group_id", "settler"),
        ("cql_contact_points", ("127.0.0.1:9042",)),
        ("keyspace", "settlement"),
        ("metrics_port", 9108),
        ("registry", DEFAULT_REGISTRY),
    ],
)
def test_defaults_are_the_ones_in_the_spec(setting: str, expected: Any) -> None:
    settings = load_settings(environ=NO_ENVIRONMENT)

    assert getattr(settings, setting) == expected


def test_the_default_registry_is_the_file_shipped_inside_the_package() -> None:
    settings = load_settings(environ=NO_ENVIRONMENT)

    assert settings.registry.name == "default_registry.toml"
    assert settings.registry.parent.name == "settler"
    assert settings.registry.is_file()


def test_default_keyspace_replication_is_simple_strategy_with_one_replica() -> None:
    settings = load_settings(environ=NO_ENVIRONMENT)

    assert settings.replication == "{'class': 'SimpleStrategy', 'replication_factor': 1}"


def test_every_spec_variable_is_read_from_the_environment(tmp_path: Path) -> None:
    registry = tmp_path / "registry.toml"
    registry.write_text(DEFAULT_REGISTRY.read_text())
    environ = {
        "SETTLER_KAFKA_BOOTSTRAP": "kafka-1:9092,kafka-2:9092",
        "SETTLER_TOPICS": "trades, deposits",
        "SETTLER_DLQ_TOPIC": "trades.dlq",
        "SETTLER_GROUP_ID": "settler-eu",
        "SETTLER_CQL_CONTACT_POINTS": "10.0.0.1:9042,10.0.0.2:9042",
        "SETTLER_KEYSPACE": "ledger",
        "SETTLER_REGISTRY": str(registry),
        "SETTLER_METRICS_PORT": "9200",
    }

    settings = load_settings(environ=environ)

    assert settings.kafka_bootstrap == "kafka-1:9092,kafka-2:9092"
    assert settings.topics == ("trades", "deposits")
    assert settings.dlq_topic == "trades.dlq"
    assert settings.group_id == "settler-eu"
    assert settings.cql_contact_points == ("10.0.0.1:9042", "10.0.0.2:9042")
    assert settings.keyspace == "ledger"
    assert settings.registry == registry
    assert settings.metrics_port == 9200


def test_comma_separated_lists_drop_blanks_and_surrounding_spaces() -> None:
    settings = load_settings(environ={"SETTLER_TOPICS": " a , b,, c ,"})

    assert settings.topics == ("a", "b", "c")


def test_variables_without_the_settler_prefix_are_ignored() -> None:
    settings = load_settings(environ={"METRICS_PORT": "1", "KEYSPACE": "other"})

    assert (settings.metrics_port, settings.keyspace) == (9108, "settlement")


def test_toml_file_overrides_the_defaults(tmp_path: Path) -> None:
    config = toml_file(
        tmp_path,
        'keyspace = "ledger"\nmetrics_port = 9200\ntopics = ["trades", "deposits"]\n',
    )

    settings = load_settings(config, environ=NO_ENVIRONMENT)

    assert settings.keyspace == "ledger"
    assert settings.metrics_port == 9200
    assert settings.topics == ("trades", "deposits")
    assert settings.group_id == "settler"


def test_environment_overrides_the_toml_file(tmp_path: Path) -> None:
    config = toml_file(tmp_path, 'keyspace = "from_file"\nmetrics_port = 9200\n')

    settings = load_settings(config, environ={"SETTLER_METRICS_PORT": "9300"})

    assert settings.metrics_port == 9300
    assert settings.keyspace == "from_file"


def test_toml_integers_are_accepted_for_integer_settings(tmp_path: Path) -> None:
    config = toml_file(tmp_path, "max_in_flight = 8\ncql_request_timeout_s = 3\n")

    settings = load_settings(config, environ=NO_ENVIRONMENT)

    assert (settings.max_in_flight, settings.cql_request_timeout_s) == (8, 3)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SETTLER_METRICS_PORT", "abc"),
        ("SETTLER_METRICS_PORT", "70000"),
        ("SETTLER_METRICS_PORT", "-1"),
        ("SETTLER_METRICS_PORT", ""),
        ("SETTLER_METRICS_PORT", "9108.5"),
        ("SETTLER_API_PORT", "65536"),
        ("SETTLER_TOPICS", ""),
        ("SETTLER_TOPICS", " , ,"),
        ("SETTLER_CQL_CONTACT_POINTS", ","),
        ("SETTLER_REGISTRY", "/nonexistent/registry.toml"),
        ("SETTLER_MAX_IN_FLIGHT", "0"),
        ("SETTLER_RETRY_MAX_MS", "-5"),
        ("SETTLER_LOG_LEVEL", "loud"),
        ("SETTLER_LOG_FORMAT", "xml"),
        ("SETTLER_CQL_CONSISTENCY", "local_quorum"),
        ("SETTLER_KAFKA_SECURITY_PROTOCOL", "TLS"),
        ("SETTLER_KAFKA_SASL_MECHANISM", "GSSAPI"),
        ("SETTLER_REPLICATION", "EverywhereStrategy"),
        ("SETTLER_REPLICATION", "SimpleStrategy:0"),
        ("SETTLER_REPLICATION", "NetworkTopologyStrategy:dc1"),
    ],
)
def test_an_invalid_environment_value_is_a_config_error_naming_the_variable(
    variable: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(environ={variable: value})


def test_an_invalid_value_in_the_toml_file_is_a_config_error_naming_setting_and_file(
    tmp_path: Path,
) -> None:
    config = toml_file(tmp_path, "metrics_port = 70000\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ=NO_ENVIRONMENT)

    assert "metrics_port" in str(caught.value)
    assert str(config) in str(caught.value)


def test_a_valid_environment_value_rescues_an_invalid_one_in_the_toml_file(
    tmp_path: Path,
) -> None:
    config = toml_file(tmp_path, "metrics_port = 70000\n")

    settings = load_settings(config, environ={"SETTLER_METRICS_PORT": "9200"})

    assert settings.metrics_port == 9200


def test_an_unknown_key_in_the_toml_file_is_rejected(tmp_path: Path) -> None:
    config = toml_file(tmp_path, 'keyspace = "ledger"\nmetric_port = 9200\n')

    with pytest.raises(ConfigError, match="metric_port"):
        load_settings(config, environ=NO_ENVIRONMENT)


def test_a_toml_table_is_rejected_as_an_unknown_key(tmp_path: Path) -> None:
    config = toml_file(tmp_path, '[kafka]\nbootstrap = "k:9092"\n')

    with pytest.raises(ConfigError, match="kafka"):
        load_settings(config, environ=NO_ENVIRONMENT)


def test_a_config_file_that_is_not_toml_is_a_config_error(tmp_path: Path) -> None:
    config = toml_file(tmp_path, "keyspace = \n")

    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config, environ=NO_ENVIRONMENT)


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.toml", environ=NO_ENVIRONMENT)


def test_network_topology_replication_becomes_a_per_datacenter_map() -> None:
    settings = load_settings(environ={"SETTLER_REPLICATION": "NetworkTopologyStrategy:dc1=3,dc2=2"})

    assert settings.replication == "{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2}"


def test_secrets_are_masked_in_the_redacted_settings() -> None:
    settings = load_settings(
        environ={"SETTLER_CQL_PASSWORD": "hunter2", "SETTLER_KAFKA_SASL_PASSWORD": "s3cret"}
    )

    redacted = settings.redacted()

    assert redacted["cql_password"] == "***"
    assert redacted["kafka_sasl_password"] == "***"
    assert "hunter2" not in repr(redacted) and "s3cret" not in repr(redacted)
    assert settings.cql_password == "hunter2"


def test_help_lists_every_option_as_an_environment_variable_with_its_default() -> None:
    text = help_table()

    for name, option in OPTIONS.items():
        line = next(line for line in text.splitlines() if env_name(name) + " " in line)
        if name != "registry" and option.default:
            assert f"[default: {option.default}]" in line


@pytest.mark.parametrize(
    "variable",
    ["SETTLER_KAFKA_BOOTSTRAP", "SETTLER_DLQ_TOPIC", "SETTLER_GROUP_ID", "SETTLER_KEYSPACE"],
)
def test_an_empty_required_setting_is_a_config_error(variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(environ={variable: ""})
