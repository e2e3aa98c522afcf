"""`settler run`: the long-lived settling worker.

Data flow, one module per stage: Kafka records -> `intake` (fetch, decode, load) ->
`pipeline` (plan with the Ledger, issue claims then ONE LOGGED batch per group, land) ->
`committing` (dead letters, queued by `dead_letters`, and offsets in one Kafka
transaction). `session` runs one writer session (an epoch of the lease), `kafka_clients`
its consumer and producer, `rebalance` its rebalance rule and where each partition
starts; `tenure` holds the lease from taking it to releasing it; `takeover` says how long
a new writer waits before reading; `main` starts the worker and `role` alternates standby
and writer tenures.
"""

from settler.worker.main import Worker, run_worker
from settler.worker.rebalance import REVOKE_DRAIN_S
from settler.worker.session import (
    CLOSE_TIMEOUT_S,
    DRAIN_TIMEOUT_S,
    SHUTDOWN_BUDGET_S,
    SessionEnd,
)

__all__ = [
    "CLOSE_TIMEOUT_S",
    "DRAIN_TIMEOUT_S",
    "REVOKE_DRAIN_S",
    "SHUTDOWN_BUDGET_S",
    "SessionEnd",
    "Worker",
    "run_worker",
]
