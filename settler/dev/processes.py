"""The stack's JVMs as processes: start one detached, find it again (pid file, else a scan
of /proc for our markers), freeze and thaw it for fault tests, and stop it (SIGTERM, then
SIGKILL). A pid is trusted only while its command line carries this stack's marker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from settler.dev.paths import pid_path, stack_dir
from settler.dev.services import (
    MAIN_CLASS,
    SECURE_SERVICE,
    SERVICES,
    DevStackError,
    check_service,
)

STOP_TIMEOUT_S = 30.0


def proc_state(pid: int) -> str | None:
    """The kernel's one-letter process state, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) S ..." - comm may contain spaces and parentheses.
    return stat[stat.rfind(")") + 2 :].split(" ", 1)[0]


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def marker() -> str:
    """The JVM property that tells this stack's JVMs from any other stack's (or anyone's)."""
    return f"-Dsettler.devstack={stack_dir()}"


def service_marker(service: str) -> str:
    return f"-Dsettler.devstack.service={service}"


def is_ours(pid: int, service: str) -> bool:
    """Whether `pid` is a live (not zombie) JVM that this stack started for `service`."""
    state = proc_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    argv = cmdline(pid)
    if MAIN_CLASS[service] not in argv or marker() not in argv:
        return False
    # Both Cassandras share a main class; only the secure one carries a service marker
    # (a plain node started before the marker existed has none).
    return (service_marker(SECURE_SERVICE) in argv) == (service == SECURE_SERVICE)


def _scan_for(service: str) -> int | None:
    """Find our JVM for `service` when its pid file is missing."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and is_ours(int(entry.name), service):
            return int(entry.name)
    return None


def pid_of(service: str) -> int | None:
    path = pid_path(service)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        pid = None
    if pid is not None and is_ours(pid, service):
        return pid
    found = _scan_for(service)
    if found is not None:
        write_pid(service, found)
    else:
        path.unlink(missing_ok=True)
    return found


def write_pid(service: str, pid: int) -> None:
    path = pid_path(service)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid}\n")


def pids() -> dict[str, int | None]:
    """The pid of each service's JVM, or None when it is not running; the secure Cassandra
    is listed only while it runs."""
    found = {service: pid_of(service) for service in SERVICES}
    secure = pid_of(SECURE_SERVICE)
    if secure is not None:
        found[SECURE_SERVICE] = secure
    return found


def _signal(service: str, signum: signal.Signals) -> int:
    check_service(service)
    pid = pid_of(service)
    if pid is None:
        raise DevStackError(f"{service} is not running (settler dev up starts it)")
    os.kill(pid, signum)
    return pid


def pause(service: str) -> None:
    """SIGSTOP the service's JVM: it keeps its sockets but answers nothing until `resume`.

    Returns once the kernel reports the process stopped.
    """
    pid = _signal(service, signal.SIGSTOP)
    wait_for_state(pid, stopped=True)


def resume(service: str) -> None:
    """SIGCONT the service's JVM after `pause`; returns once it runs again."""
    pid = _signal(service, signal.SIGCONT)
    wait_for_state(pid, stopped=False)


def wait_for_state(pid: int, *, stopped: bool, timeout_s: float = 5.0) -> None:
    """Until the kernel reports the process stopped (or running again); a fault test that
    believes it froze a service that still runs would prove nothing, so this fails."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = proc_state(pid)
        if state is None:
            raise DevStackError(f"process {pid} exited while waiting for it to "
                                f"{'stop' if stopped else 'continue'}")
        if (state == "T") == stopped:
            return
        if time.monotonic() > deadline:
            raise DevStackError(f"process {pid} did not {'stop' if stopped else 'continue'} "
                                f"within {timeout_s}s (state {state!r})")
        time.sleep(0.01)


def spawn(argv: list[str], log: Path) -> int:
    """Start `argv` detached (own session, stdin /dev/null, output appended to `log`).

    A throw-away shell starts it in the background and exits, so the JVM is re-parented
    and never becomes a zombie of the (possibly long-lived) calling process.
    """
    script = 'log="$1"; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'
    result = subprocess.run(
        ["/bin/sh", "-c", script, "sh", str(log), *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        start_new_session=True,
        cwd=stack_dir(),
        timeout=30,
        check=False,
    )
    if result.returncode != 0 or not result.stdout.strip().isdigit():
        raise DevStackError(f"could not start {argv[0]}: {result.stderr.strip() or 'no pid'}")
    return int(result.stdout.strip())


def stop(running: dict[str, int], say: Callable[[str], None], started: float) -> None:
    """SIGTERM each service, wait up to STOP_TIMEOUT_S, then SIGKILL what is left."""
    stopping = list(running)
    running = dict(running)
    for service, pid in running.items():
        say(f"stopping {service} (pid {pid})...")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)  # a paused JVM handles SIGTERM only once resumed
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while running and time.monotonic() < deadline:
        for service, pid in list(running.items()):
            if not is_ours(pid, service):
                say(f"{service} stopped ({time.monotonic() - started:.1f}s)")
                del running[service]
        if running:
            time.sleep(0.25)
    for service, pid in running.items():
        say(f"{service} did not stop within {STOP_TIMEOUT_S:.0f}s: killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    kill_deadline = time.monotonic() + 10.0
    while any(is_ours(pid, svc) for svc, pid in running.items()):
        if time.monotonic() > kill_deadline:
            raise DevStackError("a dev stack JVM survived SIGKILL: " + ", ".join(running))
        time.sleep(0.1)
    for service in stopping:
        pid_path(service).unlink(missing_ok=True)
