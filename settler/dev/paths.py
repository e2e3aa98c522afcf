"""Where the dev stack keeps things: the configs it starts from (`deploy/local/`, checked
in) and everything it writes at run time under `stack_dir()` (data, logs, pid files,
classpaths, rendered configs), plus the lock that serialises up/down between processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from settler.dev.services import DevStackError

STACK_DIR_ENV = "SETTLER_STACK_DIR"
LOG_TAIL_LINES = 20


def repo_root() -> Path:
    """The directory holding the `settler` package (and `deploy/`)."""
    return Path(__file__).resolve().parents[2]


def deploy_dir() -> Path:
    """`<repo root>/deploy/local`: the poms, server configs and JVM options of the stack."""
    path = repo_root() / "deploy" / "local"
    if not (path / "pom.xml").is_file():
        raise DevStackError(f"{path}/pom.xml not found: the dev stack runs from a source checkout")
    return path


def stack_dir() -> Path:
    """`<repo root>/.stack`, or `$SETTLER_STACK_DIR` when set."""
    override = os.environ.get(STACK_DIR_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return repo_root() / ".stack"


def log_path(service: str) -> Path:
    return stack_dir() / "logs" / f"{service}.log"


def pid_path(service: str) -> Path:
    return stack_dir() / "run" / f"{service}.pid"


def classpath_path(service: str) -> Path:
    return stack_dir() / "classpath" / f"{service}.txt"


def rotate(log: Path) -> None:
    """Keep the previous run's log as `<name>.1`, so a failed start shows only its own."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if log.exists() and log.stat().st_size > 0:
        log.replace(log.with_name(log.name + ".1"))


def log_tail(service: str, lines: int = LOG_TAIL_LINES) -> str:
    path = log_path(service)
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError:
        return f"  (no log at {path})"
    tail = [_clip(line) for line in text.splitlines()[-lines:]]
    return "\n".join(f"  | {line}" for line in tail) or f"  (empty log {path})"


def _clip(line: str, width: int = 300) -> str:
    return line if len(line) <= width else line[: width - 3] + "..."


def error_with_log(service: str, message: str) -> DevStackError:
    """An error that carries the end of the service's log: why a JVM failed is there."""
    return DevStackError(
        f"{message} (log: {log_path(service)})\n"
        f"last lines of {log_path(service).name}:\n{log_tail(service)}"
    )


@contextlib.contextmanager
def stack_lock() -> Iterator[None]:
    """Serialise up/down between processes (e.g. parallel test workers)."""
    directory = stack_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "devstack.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
