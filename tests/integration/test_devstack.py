"""settler.dev.stack: port parsing, status output, and (with the stack up) live status."""

from __future__ import annotations

from pathlib import Path

import pytest

from settler.config import Settings, load_settings
from settler.dev import stack as devstack


def _settings(**env: str) -> Settings:
    return load_settings(environ=env)


def test_ports_default_to_spec() -> None:
    ports = devstack.ports_for(_settings())
    assert (ports.kafka, ports.kafka_controller, ports.cql) == (9092, 9093, 9042)


def test_ports_follow_settings() -> None:
    settings = _settings(
        SETTLER_KAFKA_BOOTSTRAP="localhost:19092,127.0.0.1:29092",
        SETTLER_CQL_CONTACT_POINTS="127.0.0.1:19042",
    )
    ports = devstack.ports_for(settings)
    assert (ports.kafka, ports.kafka_controller, ports.cql) == (19092, 19093, 19042)


def test_non_loopback_address_is_refused() -> None:
    with pytest.raises(devstack.DevStackError, match="loopback only"):
        devstack.ports_for(_settings(SETTLER_KAFKA_BOOTSTRAP="10.1.2.3:9092"))


def test_stack_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(devstack.STACK_DIR_ENV, str(tmp_path))
    assert devstack.stack_dir() == tmp_path.resolve()
    monkeypatch.delenv(devstack.STACK_DIR_ENV)
    assert devstack.stack_dir() == Path(devstack.__file__).resolve().parents[2] / ".stack"


def test_unknown_service_is_an_error() -> None:
    with pytest.raises(devstack.DevStackError, match="unknown service"):
        devstack.pause("zookeeper")


def test_status_of_an_empty_stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(devstack.STACK_DIR_ENV, str(tmp_path))
    settings = _settings(
        SETTLER_KAFKA_BOOTSTRAP="127.0.0.1:1", SETTLER_CQL_CONTACT_POINTS="127.0.0.1:2"
    )
    statuses = devstack.status(settings)
    assert [(s.name, s.state, s.pid) for s in statuses] == [
        ("kafka", "stopped", None),
        ("cassandra", "stopped", None),
    ]
    text = devstack.format_status(statuses)
    assert "kafka" in text and "cassandra" in text
    assert str(tmp_path / "logs" / "kafka.log") in text
    assert devstack.pids() == {"kafka": None, "cassandra": None}
    devstack.down(settings, quiet=True)  # harmless when nothing runs


def test_jvm_options_files_parse() -> None:
    kafka = devstack._jvm_options("kafka")
    cassandra = devstack._jvm_options("cassandra")
    assert "-Xmx512m" in kafka
    assert "-Xmx1g" in cassandra
    assert any(option.startswith("--add-opens=") for option in cassandra)
    assert not any(option.startswith("#") for option in kafka + cassandra)


def _stack_running() -> bool:
    return all(pid is not None for pid in devstack.pids().values())


live = pytest.mark.skipif(not _stack_running(), reason="dev stack not running (settler dev up)")


@pytest.mark.integration
@live
def test_live_status_and_versions() -> None:
    settings = load_settings()
    statuses = {s.name: s for s in devstack.status(settings)}
    assert statuses["kafka"].state == "running"
    assert statuses["cassandra"].state == "running"
    versions = devstack.server_versions(settings)
    assert versions["kafka"][0].isdigit()
    assert versions["cassandra"].startswith("5.0.")


@pytest.mark.integration
@live
def test_pause_and_resume_cassandra() -> None:
    settings = load_settings()
    devstack.pause("cassandra")
    try:
        states = {s.name: s.state for s in devstack.status(settings)}
        assert states["cassandra"] == "paused"
    finally:
        devstack.resume("cassandra")
    states = {s.name: s.state for s in devstack.status(settings)}
    assert states["cassandra"] == "running"
