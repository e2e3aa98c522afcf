"""The shipped defaults that the guarantees depend on, pinned: each must equal the value
README.md and ARCHITECTURE.md document, so that changing one is a visible, deliberate
diff of this file and of the documentation together."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from settler import worker
from settler.config import OPTIONS, env_name, load_settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
ARCHITECTURE = (ROOT / "ARCHITECTURE.md").read_text()

# setting -> its shipped default. Takeover time after a crash (lease TTL, takeover wait),
# how long a request may hang and how retries back off, how often settled offsets are
# committed, how much is in flight, and what memory holds.
PINNED = {
    "lease_ttl_s": 10,
    "takeover_wait_s": 15,
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
DRAIN_TIMEOUT_S = 4.0


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


def test_architecture_states_the_lease_ttl_and_the_takeover_wait() -> None:
    assert f"`SETTLER_LEASE_TTL_S`, {PINNED['lease_ttl_s']} s" in ARCHITECTURE
    assert f"`SETTLER_TAKEOVER_WAIT_S` ({PINNED['takeover_wait_s']} s" in ARCHITECTURE


def test_the_sigterm_budget_is_pinned_and_documented() -> None:
    assert worker.SHUTDOWN_BUDGET_S == SHUTDOWN_BUDGET_S
    assert worker.DRAIN_TIMEOUT_S == DRAIN_TIMEOUT_S
    (row,) = [line for line in ARCHITECTURE.splitlines() if line.startswith("| SIGTERM/SIGINT")]
    assert f"up to {DRAIN_TIMEOUT_S:g} s" in row
    assert f"within {SHUTDOWN_BUDGET_S:g} s (`settler.worker.SHUTDOWN_BUDGET_S`)" in row
