"""Logging: structlog, JSON lines by default, a console renderer on a terminal.

The drivers' own stdlib logging (cassandra, aiokafka) goes through the same renderer, so a
log shipper sees one format. Secrets never reach a line: `Settings` objects are logged as
`Settings.redacted()`, and values under secret-looking keys are masked wherever they sit.
Lines about an event carry `event_id`, `topic`, `partition`, `offset` (see `event_fields`).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, Final, TextIO

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

from settler.config import Settings

MASK: Final = "***"

# Matches kafka_sasl_password, cql_password, api_key, X-API-Key, token, secret ...
_SECRET_KEY: Final = re.compile(
    r"pass(word|wd)?$|secret|token|api[-_]?key|authorization|credential", re.IGNORECASE
)

_HANDLER_NAME: Final = "settler"


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog and the stdlib root logger once, at start-up of a command.

    `level` is SETTLER_LOG_LEVEL (debug, info, warning, error); `fmt` is SETTLER_LOG_FORMAT
    (json, console, or auto: console when stderr is a terminal)."""
    out = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Processor = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    # ConsoleRenderer formats exceptions itself (and warns if they arrive pre-formatted).
    exceptions: list[Processor] = [] if console else [structlog.processors.format_exc_info]
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    structlog.configure(
        processors=[*shared, _add_logger_name, *exceptions, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_NamedPrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared, *exceptions],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    # The drivers are chatty at INFO (every connection, every metadata refresh).
    root.setLevel(max(numeric, logging.WARNING))


def get(name: str) -> structlog.stdlib.BoundLogger:
    """A logger whose lines say `"logger": name`. Lazy: modules call this at import time,
    before `configure()`, so nothing may bind it here (binding would freeze the default
    configuration into it)."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger


class _NamedPrintLogger(structlog.PrintLogger):
    """A PrintLogger that knows the name `get(name)` asked for."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _NamedPrintLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _NamedPrintLogger:
        return _NamedPrintLogger(self._file, str(args[0]) if args else "")


def _add_logger_name(logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", "")
    if name:
        event_dict.setdefault("logger", name)
    return event_dict


def event_fields(topic: str, partition: int, offset: int, event_id: int | None = None,
                 **extra: Any) -> dict[str, Any]:
    """The fields every line about one event carries: where it sits in Kafka and its id."""
    fields: dict[str, Any] = {"topic": topic, "partition": partition, "offset": offset}
    if event_id is not None:
        fields["event_id"] = event_id
    fields.update(extra)
    return fields


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: no password, key or token in a log line, however it got there."""
    for key, value in event_dict.items():
        event_dict[key] = _masked(key, value)
    return event_dict


def _masked(key: str, value: Any) -> Any:
    if isinstance(value, Settings):
        return value.redacted()
    if isinstance(key, str) and _SECRET_KEY.search(key) and value not in (None, "", b""):
        return MASK
    if isinstance(value, Mapping):
        return {k: _masked(k, v) for k, v in value.items()}
    return value
