"""The single-writer lease and the write timestamps it fences.

Balances are absolute values computed in one process's memory, so exactly one worker
per keyspace may write. The lease is one row taken and renewed with lightweight
transactions (a single partition, so LWT applies). A worker that cannot take it waits
as a standby. Fencing does not depend on clocks agreeing: the holder never uses a write
timestamp above the `ts_ceiling` it has recorded in the lease, and a new holder starts
above the previous ceiling, so late writes of a stalled former holder always lose.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from cassandra import ConsistencyLevel
from cassandra.cluster import Session
from cassandra.query import PreparedStatement

from settler import cql

LEASE_NAME: Final = "writer"

_CQL: Final = {
    "read": "SELECT owner, epoch, expires_at, ts_ceiling FROM {ks}.writer_lease WHERE name = ?",
    "create": (
        "INSERT INTO {ks}.writer_lease (name, owner, epoch, expires_at, ts_ceiling)"
        " VALUES (?, ?, 1, ?, ?) IF NOT EXISTS"
    ),
    "take": (
        "UPDATE {ks}.writer_lease SET owner = ?, epoch = ?, expires_at = ?, ts_ceiling = ?"
        " WHERE name = ? IF epoch = ?"
    ),
    "renew": (
        "UPDATE {ks}.writer_lease SET expires_at = ?, ts_ceiling = ?"
        " WHERE name = ? IF owner = ? AND epoch = ?"
    ),
    "release": (
        "UPDATE {ks}.writer_lease SET owner = null, expires_at = 0, ts_ceiling = ?"
        " WHERE name = ? IF owner = ? AND epoch = ?"
    ),
}


class LeaseLost(Exception):
    """Another worker holds the lease now: stop writing at once."""


@dataclass(frozen=True, slots=True)
class Holder:
    owner: str | None
    epoch: int
    expires_at_ms: int
    ts_ceiling: int


def _now_us() -> int:
    return time.time_ns() // 1000


def new_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class WriterLease:
    def __init__(self, session: Session, *, ttl_s: float, owner: str | None = None,
                 name: str = LEASE_NAME) -> None:
        self.session = session
        self.owner = owner or new_owner_id()
        self.name = name
        self.ttl_s = ttl_s
        self.epoch = 0
        self._ceiling = 0
        self._last_ts = 0
        self._valid_until = 0.0  # monotonic deadline of our own right to write
        self.took_over_expired = False  # the previous holder died instead of releasing
        self._lost = asyncio.Event()
        self._statements: dict[str, PreparedStatement] = {}
        for key, text in _CQL.items():
            statement = session.prepare(text.format(ks=session.keyspace))
            statement.consistency_level = ConsistencyLevel.QUORUM
            statement.serial_consistency_level = ConsistencyLevel.SERIAL
            self._statements[key] = statement
        self._statements["read"].consistency_level = ConsistencyLevel.SERIAL

    # -- taking it ------------------------------------------------------------------------

    async def read(self) -> Holder | None:
        rows = cql.rows_of(await cql.run(self.session, self._statements["read"], (self.name,)))
        row = next(iter(rows), None)
        if row is None:
            return None
        owner, epoch, expires_at, ceiling = row
        return Holder(owner, epoch or 0, expires_at or 0, ceiling or 0)

    async def try_acquire(self) -> Holder | None:
        """Take the lease if it is free or expired. Returns None on success, else the
        current holder."""
        holder = await self.read()
        now_ms, now_us, started = int(time.time() * 1000), _now_us(), time.monotonic()
        if holder is not None and holder.owner is not None and holder.expires_at_ms > now_ms:
            return holder
        floor = max(now_us, (holder.ts_ceiling + 1) if holder else 0)
        ceiling = floor + self._ceiling_span_us()
        expires = now_ms + int(self.ttl_s * 1000)
        if holder is None:
            result = await self._lwt("create", (self.name, self.owner, expires, ceiling))
            epoch = 1
        else:
            epoch = holder.epoch + 1
            result = await self._lwt(
                "take", (self.owner, epoch, expires, ceiling, self.name, holder.epoch)
            )
        if not result:
            return await self.read() or Holder(None, 0, 0, 0)
        self.epoch, self._ceiling, self._last_ts = epoch, ceiling, floor - 1
        self.took_over_expired = holder is not None and holder.owner is not None
        self._valid_until = started + self.ttl_s * 0.8
        self._lost.clear()
        return None

    async def acquire(self, on_standby: Callable[[Holder], None], poll_s: float = 1.0,
                      on_error: Callable[[BaseException], None] | None = None) -> None:
        """Wait, as a standby, until this worker holds the lease."""
        while True:
            try:
                holder = await self.try_acquire()
            except Exception as exc:
                if not cql.is_transient(exc):
                    raise
                if on_error:
                    on_error(exc)
                holder = Holder("unknown (database unavailable)", 0, 0, 0)
            if holder is None:
                return
            on_standby(holder)
            await asyncio.sleep(poll_s)

    # -- holding it -----------------------------------------------------------------------

    def _ceiling_span_us(self) -> int:
        return int((self.ttl_s + 1.0) * 1_000_000)

    async def renew(self) -> bool:
        """Extend the lease. False: another worker took it. Raises on database errors."""
        started = time.monotonic()
        ceiling = max(self._ceiling, _now_us() + self._ceiling_span_us())
        expires = int(time.time() * 1000) + int(self.ttl_s * 1000)
        applied = await self._lwt(
            "renew", (expires, ceiling, self.name, self.owner, self.epoch)
        )
        if not applied:
            self._lost.set()
            self._valid_until = 0.0
            return False
        self._ceiling = ceiling
        self._valid_until = started + self.ttl_s * 0.8
        return True

    async def keep(self, on_error: Callable[[BaseException], None]) -> None:
        """Renew every third of the lifetime until lost or cancelled."""
        while not self._lost.is_set():
            await asyncio.sleep(self.ttl_s / 3 if self.valid else 0.5)
            try:
                await self.renew()
            except Exception as exc:  # noqa: BLE001 - any failure: the lease lapses by itself
                on_error(exc)

    @property
    def valid(self) -> bool:
        return not self._lost.is_set() and time.monotonic() < self._valid_until

    @property
    def lost(self) -> asyncio.Event:
        return self._lost

    def next_timestamp(self) -> int | None:
        """A write timestamp (µs) above every earlier one of this and former holders, or
        None while this worker may not write (lease not renewed in time)."""
        if not self.valid:
            return None
        ts = max(_now_us(), self._last_ts + 1)
        if ts > self._ceiling:
            return None
        self._last_ts = ts
        return ts

    async def release(self) -> None:
        """Give the lease up so a standby takes over at once; keeps the fencing ceiling."""
        if self.epoch == 0 or self._lost.is_set():
            return
        self._lost.set()
        await self._lwt("release", (self._last_ts, self.name, self.owner, self.epoch))

    async def _lwt(self, key: str, parameters: tuple[Any, ...]) -> bool:
        rows = cql.rows_of(await cql.run(self.session, self._statements[key], parameters))
        first = next(iter(rows), None)
        return bool(first is not None and first[0])
