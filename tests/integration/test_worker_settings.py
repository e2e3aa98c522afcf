"""Settings the worker refuses at start-up: exit 2 with one line naming the setting."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests import harness

pytestmark = pytest.mark.integration


def run_worker(env: harness.TestEnv, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "settler", "run"], env=env.environ(**extra),
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_metrics_port_in_use_exits_2_naming_the_setting(env: harness.TestEnv) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_worker(env, SETTLER_METRICS_PORT=str(port))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("settler: SETTLER_METRICS_PORT:") and str(port) in last, last
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("level", ["ONE", "LOCAL_ONE", "ANY"])
def test_a_consistency_level_that_does_not_overlap_writes_is_refused(
        env: harness.TestEnv, level: str) -> None:
    result = run_worker(env, SETTLER_CQL_CONSISTENCY=level)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "SETTLER_CQL_CONSISTENCY" in last and "does not overlap" in last, last
