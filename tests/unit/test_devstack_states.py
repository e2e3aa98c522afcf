"""`devstack.pause`/`resume` wait for the kernel to report the new state, and fail when it
never comes: a fault test must not believe it froze a service that still runs."""

from __future__ import annotations

import signal
import subprocess

import pytest

from settler.dev import stack as devstack


def test_waiting_for_a_stop_that_never_comes_fails() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(devstack.DevStackError, match="did not stop"):
            devstack._wait_for_state(proc.pid, stopped=True, timeout_s=0.3)
    finally:
        proc.kill()
        proc.wait()


def test_waiting_on_a_process_that_exited_fails() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(devstack.DevStackError, match="exited"):
        devstack._wait_for_state(proc.pid, stopped=True, timeout_s=0.3)


def test_a_stopped_process_is_seen_stopped_then_running() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        proc.send_signal(signal.SIGSTOP)
        devstack._wait_for_state(proc.pid, stopped=True)
        proc.send_signal(signal.SIGCONT)
        devstack._wait_for_state(proc.pid, stopped=False)
    finally:
        proc.kill()
        proc.wait()
