"""The shipped defaults that the guarantees depend on, pinned: each must equal the value
README.md and ARCHITECTURE.md document, so that changing one is a visible, deliberate
diff of this file and of the documentation together."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from settler import worker
from settler.config import OPTIONS, env_name, load_settings
from settler.store.lease import VALID_SHARE
from settler.worker.main import BATCH_BYTES_SHARE
from settler.worker.takeover import BATCHLOG_REPLAY_S, NODE_UPTIME_S, takeover_wait_s

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
ARCHITECTURE = (ROOT / "ARCHITECTURE.md").read_text()

# setting -> its shipped default. Takeover time after a crash (lease TTL, takeover wait),
# how long a request may hang and how retries back off, how often settled offsets are
# committed, how much is in flight, and what memory holds.
PINNED = {
    "lease_ttl_s": 10,
    "cql_request_timeout_s": 10,
    "retry_initial_ms": 100,
    "retry_max_ms": 5000,
    "commit_interval_ms": 500,
    "batch_events": 32,
    "max_in_flight": 256,
    "fetch_max_records": 2000,
    "balance_cache_rows": 200_000,
    "recent_ids": 500_000,
}
SHUTDOWN_BUDGET_S = 10.0
DRAIN_TIMEOUT_S = 3.0
REVOKE_DRAIN_S = 20.0
# The takeover wait is derived from the database unless set: a request in transit (up
# to the request timeout) and then its batchlog replay (Cassandra: 2 x
# write_request_timeout, checked every 10 s; ScyllaDB: a 60 s loop).
TAKEOVER_WAIT = {"cassandra": 25, "scylla": 75}


def readme_defaults() -> dict[str, str]:
    """`| SETTLER_NAME | value ...` rows of the README's settings table: name -> value."""
    return {
        name: value
        for name, value in re.findall(r"^\| (SETTLER_[A-Z_]+) \| ([^\s|:]+)", README, re.M)
    }


@pytest.mark.parametrize("setting", sorted(PINNED))
def test_a_guarantee_related_default_is_the_pinned_value(setting: str) -> None:
    assert getattr(load_settings(environ={}), setting) == PINNED[setting]


@pytest.mark.parametrize("setting", sorted(PINNED))
def test_the_readme_documents_the_pinned_default(setting: str) -> None:
    documented = readme_defaults().get(env_name(setting))

    assert documented is not None, f"README's settings table has no row for {env_name(setting)}"
    assert int(documented) == PINNED[setting] == int(OPTIONS[setting].default)


def test_the_takeover_wait_is_derived_and_pinned_per_database() -> None:
    assert load_settings(environ={}).takeover_wait_s is None  # auto
    assert OPTIONS["takeover_wait_s"].default == "auto"
    assert BATCHLOG_REPLAY_S == {"cassandra": 15, "scylla": 65}
    shipped = load_settings(environ={}).cql_request_timeout_s
    assert {server: takeover_wait_s(server, shipped) for server in TAKEOVER_WAIT} == (
        TAKEOVER_WAIT)
    row = readme_row("SETTLER_TAKEOVER_WAIT_S")
    assert (f"{TAKEOVER_WAIT['cassandra']} for Cassandra" in row
            and f"{TAKEOVER_WAIT['scylla']} for ScyllaDB" in row), row


def test_a_restarted_nodes_batchlog_bound_is_pinned_and_documented() -> None:
    assert NODE_UPTIME_S == {"cassandra": 45, "scylla": 75}
    assert "30-40 s after it starts" in ARCHITECTURE


def test_validity_and_the_batch_bound_shares_are_pinned() -> None:
    assert VALID_SHARE == 0.8 and "80% of its TTL" in ARCHITECTURE
    assert BATCH_BYTES_SHARE == 0.8 and "80% of the server's `batch_size_fail_threshold`" in (
        ARCHITECTURE)
    assert worker.REVOKE_DRAIN_S == REVOKE_DRAIN_S
    assert f"`REVOKE_DRAIN_S` ({REVOKE_DRAIN_S:g} s" in ARCHITECTURE


def test_architecture_states_the_lease_ttl_and_the_takeover_wait() -> None:
    assert f"`SETTLER_LEASE_TTL_S`, {PINNED['lease_ttl_s']} s" in ARCHITECTURE
    assert (f"{TAKEOVER_WAIT['cassandra']} s for Cassandra" in ARCHITECTURE
            and f"{TAKEOVER_WAIT['scylla']} s for ScyllaDB" in ARCHITECTURE)


def readme_row(name: str) -> str:
    (row,) = [line for line in README.splitlines() if line.startswith(f"| {name} |")]
    return row


def test_the_sigterm_budget_is_pinned_and_documented() -> None:
    assert worker.SHUTDOWN_BUDGET_S == SHUTDOWN_BUDGET_S
    assert worker.DRAIN_TIMEOUT_S == DRAIN_TIMEOUT_S
    (row,) = [line for line in ARCHITECTURE.splitlines() if line.startswith("| SIGTERM/SIGINT")]
    assert f"up to {DRAIN_TIMEOUT_S:g} s" in row
    assert f"within {SHUTDOWN_BUDGET_S:g} s (`settler.worker.SHUTDOWN_BUDGET_S`)" in row
