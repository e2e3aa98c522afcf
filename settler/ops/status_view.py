"""How `settler status` shows what settler.ops.status read: the screen an operator reads
(about 15 lines for 3 partitions) and the same as one JSON document for tools. Pure
functions of a `Status`: nothing here reads anything.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from settler import texttable
from settler.ops.status import HEALTHY, LAGGING, Status
from settler.ops.worker_endpoint import WorkerView
from settler.store.lease import Holder


def _utc(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(value: int) -> str:
    return f"{value:,}"


def writer_line(writer: Holder | None, now_ms: int) -> str:
    if writer is None:
        return "none: no worker has taken the lease in this keyspace yet"
    ceiling = f"ts_ceiling {writer.ts_ceiling} ({_utc(writer.ts_ceiling / 1000)})"
    if writer.owner is None:
        return f"none: lease released (epoch {writer.epoch}), {ceiling}"
    left_s = (writer.expires_at_ms - now_ms) / 1000
    expiry = (f"lease expires in {left_s:.1f} s" if left_s >= 0
              else f"lease EXPIRED {-left_s:.1f} s ago (its holder stopped renewing)")
    return f"{writer.owner}  epoch {writer.epoch}  {expiry}  {ceiling}"


def worker_line(worker: WorkerView) -> str:
    if not worker.reachable:
        return f"no worker answering at {worker.url} ({worker.error})"
    readiness = "ready" if worker.ready else f"NOT READY (failing: {', '.join(worker.failing)})"
    rate = "-" if worker.events_per_s is None else f"{worker.events_per_s:,.1f}"
    p99 = "-" if worker.settle_p99_s is None else _duration(worker.settle_p99_s)
    return (f"{worker.url}  role {worker.role}  {readiness}  {rate} events/s  "
            f"settle p99 {p99}  (last minute)")


def _duration(seconds: float) -> str:
    if math.isinf(seconds):
        return "> 2 min"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def render(status: Status) -> str:
    """The screen, about 15 lines for 3 partitions."""
    lines = [
        f"settler status  {_utc(status.at_ms)}  keyspace {status.keyspace}  "
        f"group {status.group}",
        "",
        f"writer  {writer_line(status.writer, status.at_ms)}",
        f"worker  {worker_line(status.worker)}",
        "",
    ]
    if status.partitions:
        rows = [("TOPIC", "PARTITION", "COMMITTED", "END", "LAG")] + [
            (p.topic, str(p.partition), "-" if p.committed is None else _number(p.committed),
             _number(p.end), _number(p.lag))
            for p in status.partitions
        ]
        lines.append(texttable.render(rows))
    for topic in status.missing_topics:
        lines.append(f"input topic {topic} does not exist yet (created on first use)")
    verdict = (f"LAGGING: {_number(status.lag)} records not settled "
               f"(more than --max-lag {_number(status.max_lag)})"
               if status.exit_code == LAGGING else
               f"{_number(status.lag)} records not settled "
               f"(healthy: --max-lag {_number(status.max_lag)})")
    lines += [verdict, ""]
    letters = status.dead_letters
    if not letters.exists:
        lines.append(f"dead letters  none ({letters.topic} does not exist yet)")
    elif not letters.total:
        lines.append(f"dead letters  none in {letters.topic}")
    else:
        reasons = ", ".join(f"{reason} {_number(count)}" for reason, count
                            in sorted(letters.by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"dead letters  {_number(letters.total)} in {letters.topic}: {reasons}")
    return "\n".join(lines)


def document(status: Status) -> dict[str, Any]:
    """The same, for tools (`--json`)."""
    writer = status.writer
    worker = status.worker
    return {
        "at_ms": status.at_ms,
        "keyspace": status.keyspace,
        "group": status.group,
        "exit_code": status.exit_code,
        "healthy": status.exit_code == HEALTHY,
        "writer": None if writer is None else {
            "owner": writer.owner, "epoch": writer.epoch, "expires_at_ms": writer.expires_at_ms,
            "ts_ceiling": writer.ts_ceiling,
            "live": writer.owner is not None and writer.expires_at_ms > status.at_ms,
        },
        "partitions": [
            {"topic": p.topic, "partition": p.partition, "committed": p.committed,
             "start": p.start, "end": p.end, "lag": p.lag}
            for p in status.partitions
        ],
        "missing_topics": status.missing_topics,
        "lag": status.lag,
        "max_lag": status.max_lag,
        "dead_letters": {"topic": status.dead_letters.topic,
                         "exists": status.dead_letters.exists,
                         "total": status.dead_letters.total,
                         "by_reason": status.dead_letters.by_reason},
        "worker": {
            "url": worker.url, "reachable": worker.reachable, "error": worker.error or None,
            "role": worker.role or None, "ready": worker.ready if worker.reachable else None,
            "failing": list(worker.failing),
            "events_per_s": worker.events_per_s,
            "settle_p99_s": None if worker.settle_p99_s is None or math.isinf(
                worker.settle_p99_s) else worker.settle_p99_s,
        },
    }
