"""How long a new writer waits before reading, so that no batch of a former writer can
still come out of a database batchlog after it read (ARCHITECTURE.md "Two crashed writers
in a row").

Two bounds, both derived from the database: the takeover wait covers a running node's
batchlog loop; a node that started recently replays what it logged before it stopped
`NODE_UPTIME_S` after it starts, so the wait also lasts until every node has been up
that long.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Final

from settler import logs

log = logs.get("settler.worker")

TAKEOVER_WAIT_S: Final = {"cassandra": 15, "scylla": 75}
"""After taking over from a writer that died, how long its batches may still come out of
the batchlog of a running node: Cassandra replays batches older than 2 x
write_request_timeout, checking every 10 s; ScyllaDB replays on a 60 s loop."""

NODE_UPTIME_S: Final = {"cassandra": 45, "scylla": 75}
"""How long after a node starts its batchlog may replay batches logged before it stopped:
Cassandra's first replay runs RING_DELAY (30 s) after start-up, for batches older than
2 x write_request_timeout (4 s), then every 10 s; 45 s leaves the replay (throttled to
1 MiB/s) time to finish. ScyllaDB: its 60 s loop plus margin (assumed, not measured here:
no ScyllaDB runs on this project's machines)."""


async def restarted_node_wait(server: str, node_starts: Callable[[], Awaitable[list[int]]],
                              now: Callable[[], float] = time.time) -> float:
    """Seconds until every node of the cluster has been up `NODE_UPTIME_S[server]`; the
    whole bound if the start times cannot be read."""
    uptime = NODE_UPTIME_S.get(server, max(NODE_UPTIME_S.values()))
    try:
        starts = await node_starts()
    except Exception as exc:  # noqa: BLE001 - unknown start times: assume a node just started
        log.warning("database node start times not read: waiting as if one just started",
                    error=repr(exc), seconds=uptime)
        return float(uptime)
    if not starts:
        return float(uptime)
    return max(0.0, max(starts) + uptime - now())
