"""How long a new writer waits before reading, so that no batch of a former writer can
still come out of a database batchlog after it read (ARCHITECTURE.md "Two crashed writers
in a row").

Two bounds, both derived from the database: the takeover wait covers a batch still on
its way to its coordinator and then a running node's batchlog loop; a node that started
recently replays what it logged before it stopped `NODE_UPTIME_S` after it starts, so
the wait also lasts until every node has been up that long, by the database's own clock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from settler import logs

log = logs.get("settler.worker")

BATCHLOG_REPLAY_S: Final = {"cassandra": 15, "scylla": 65}
"""How long after a running node logged a batch its batchlog may still replay it:
Cassandra replays batches older than 2 x write_request_timeout (4 s), checking every
10 s (14 s, plus 1); ScyllaDB replays on a 60 s loop (plus 5, assumed: no ScyllaDB runs
on this project's machines)."""


def takeover_wait_s(server: str, request_timeout_s: int) -> int:
    """The `auto` takeover wait: a former writer's batch may reach its coordinator up to
    the CQL request timeout after it left (past that the driver gave up on it; longer is
    a known limit), then come out of the batchlog `BATCHLOG_REPLAY_S` after it was logged.
    Counted from the former writer's last send: the end of an abandoned session, or a
    TTL after the taker first saw an expired holder's last renewal (the holder sent
    nothing later than 80% of the TTL after it: the rest is spare)."""
    return BATCHLOG_REPLAY_S[server] + request_timeout_s

NODE_UPTIME_S: Final = {"cassandra": 45, "scylla": 75}
"""How long after a node starts its batchlog may replay batches logged before it stopped:
Cassandra's first replay runs RING_DELAY (30 s) after start-up, for batches older than
2 x write_request_timeout (4 s), then every 10 s; 45 s leaves the replay (throttled to
1 MiB/s) time to finish. ScyllaDB: its 60 s loop plus margin (assumed, not measured here:
no ScyllaDB runs on this project's machines)."""


async def restarted_node_wait(server: str,
                              node_uptimes: Callable[[], Awaitable[list[float]]]) -> float:
    """Seconds until every node of the cluster has been up `NODE_UPTIME_S[server]`; the
    whole bound if the uptimes cannot be read. Uptimes are the database's own (its clock
    minus its gossip generations): this worker's clock may disagree with the nodes'."""
    uptime = NODE_UPTIME_S.get(server, max(NODE_UPTIME_S.values()))
    try:
        uptimes = await node_uptimes()
    except Exception as exc:  # noqa: BLE001 - unknown start times: assume a node just started
        log.warning("database node uptimes not read: waiting as if one just started",
                    error=repr(exc), seconds=uptime)
        return float(uptime)
    if not uptimes:
        return float(uptime)
    return max(0.0, uptime - min(uptimes))
