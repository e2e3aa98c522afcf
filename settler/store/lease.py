"""The single-writer lease and the write timestamps it fences.

Balances are absolute values computed in one process's memory, so exactly one worker
per keyspace may write. The lease is one row taken and renewed with lightweight
transactions (a single partition, so LWT applies). A worker that cannot take it waits
as a standby. Every writer session has its own epoch (taking the lease, or starting a
new session while holding it, raises the epoch by one).

"Valid" is this worker's own view: the lease is valid until `VALID_SHARE` of the TTL
after the last successful renewal was *sent*, by its monotonic clock. Another worker
takes it once `expires_at` has passed by its own clock, and only if the row still holds
the renewal it judged (so no renewal lands between its look and its take). Whether the
hosts' clocks agree decides only when that happens, not what is safe: after taking over
an expired lease the new holder reads nothing until a full TTL plus the takeover wait
after it first saw the former holder's last renewal, by its own monotonic clock
(`takeover_wait_s`), and it writes above the former holder's `ts_ceiling`, so late
writes of a stalled former holder always lose.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final, Protocol

from cassandra import ConsistencyLevel
from cassandra.cluster import Session
from cassandra.query import PreparedStatement

from settler.store import cql

LEASE_NAME: Final = "writer"
VALID_SHARE: Final = 0.8
"""The share of the TTL, from sending a renewal, during which this worker writes: the
rest is the margin for clock skew between hosts and the renewal's own latency."""

_CQL: Final = {
    "read": "SELECT owner, epoch, expires_at, ts_ceiling FROM {ks}.writer_lease WHERE name = ?",
    "create": (
        "INSERT INTO {ks}.writer_lease (name, owner, epoch, expires_at, ts_ceiling)"
        " VALUES (?, ?, 1, ?, ?) IF NOT EXISTS"
    ),
    "take": (
        "UPDATE {ks}.writer_lease SET owner = ?, epoch = ?, expires_at = ?, ts_ceiling = ?"
        " WHERE name = ? IF epoch = ? AND expires_at = ?"
    ),
    "renew": (
        "UPDATE {ks}.writer_lease SET expires_at = ?, ts_ceiling = ?"
        " WHERE name = ? IF owner = ? AND epoch = ?"
    ),
    "rotate": (
        "UPDATE {ks}.writer_lease SET epoch = ?, expires_at = ?, ts_ceiling = ?"
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


class Clock(Protocol):
    """Time as the lease needs it (a simulation supplies a virtual, skewed one)."""

    def monotonic(self) -> float: ...

    def wall_us(self) -> int: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall_us(self) -> int:
        return time.time_ns() // 1000


class LeaseTable(Protocol):
    """The lease row's lightweight transactions. Each returns whether it was applied, or
    raises (a timeout leaves the outcome unknown: the caller reads the row again)."""

    async def read(self) -> Holder | None: ...

    async def create(self, owner: str, expires_ms: int, ceiling: int) -> bool: ...

    async def take(self, owner: str, epoch: int, expires_ms: int, ceiling: int,
                   expected_epoch: int, expected_expires_ms: int) -> bool:
        """Applied only if the row still holds `expected_epoch` and `expected_expires_ms`
        (the holder has not renewed since it was read)."""

    async def renew(self, owner: str, epoch: int, expires_ms: int, ceiling: int) -> bool: ...

    async def rotate(self, owner: str, epoch: int, new_epoch: int, expires_ms: int,
                     ceiling: int) -> bool: ...

    async def release(self, owner: str, epoch: int, ceiling: int) -> bool: ...


class CqlLeaseTable:
    """`LeaseTable` over the keyspace's writer_lease row (QUORUM writes, SERIAL reads)."""

    def __init__(self, session: Session, name: str = LEASE_NAME) -> None:
        self.session = session
        self.name = name
        self._statements: dict[str, PreparedStatement] = {}
        for key, text in _CQL.items():
            statement = session.prepare(text.format(ks=session.keyspace))
            statement.consistency_level = ConsistencyLevel.QUORUM
            statement.serial_consistency_level = ConsistencyLevel.SERIAL
            self._statements[key] = statement
        self._statements["read"].consistency_level = ConsistencyLevel.SERIAL

    async def read(self) -> Holder | None:
        rows = cql.rows_of(await cql.run(self.session, self._statements["read"], (self.name,)))
        row = next(iter(rows), None)
        if row is None:
            return None
        owner, epoch, expires_at, ceiling = row
        return Holder(owner, epoch or 0, expires_at or 0, ceiling or 0)

    async def create(self, owner: str, expires_ms: int, ceiling: int) -> bool:
        return await self._lwt("create", (self.name, owner, expires_ms, ceiling))

    async def take(self, owner: str, epoch: int, expires_ms: int, ceiling: int,
                   expected_epoch: int, expected_expires_ms: int) -> bool:
        return await self._lwt("take", (owner, epoch, expires_ms, ceiling, self.name,
                                        expected_epoch, expected_expires_ms))

    async def renew(self, owner: str, epoch: int, expires_ms: int, ceiling: int) -> bool:
        return await self._lwt("renew", (expires_ms, ceiling, self.name, owner, epoch))

    async def rotate(self, owner: str, epoch: int, new_epoch: int, expires_ms: int,
                     ceiling: int) -> bool:
        return await self._lwt("rotate", (new_epoch, expires_ms, ceiling, self.name, owner,
                                          epoch))

    async def release(self, owner: str, epoch: int, ceiling: int) -> bool:
        return await self._lwt("release", (ceiling, self.name, owner, epoch))

    async def _lwt(self, key: str, parameters: tuple[Any, ...]) -> bool:
        rows = cql.rows_of(await cql.run(self.session, self._statements[key], parameters))
        first = next(iter(rows), None)
        return bool(first is not None and first[0])


def new_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class WriterLease:
    """This worker's hold on the lease: taking it, renewing it, and the write timestamps
    it allows. Policy (when to renew, what to do when it lapses) is the worker's."""

    def __init__(self, table: LeaseTable, *, ttl_s: float, clock: Clock | None = None,
                 owner: str | None = None) -> None:
        self.table = table
        self.clock = clock or SystemClock()
        self.owner = owner or new_owner_id()
        self.ttl_s = ttl_s
        self.epoch = 0
        self.held = False
        self._ceiling = 0
        self._last_ts = 0
        self._valid_until = 0.0  # monotonic deadline of our own right to write
        self.took_over_expired = False  # the previous holder died instead of releasing
        self._seen: tuple[Holder | None, float] = (None, 0.0)  # a holder, first seen at
        self._former_seen_at = 0.0  # when we first saw the renewal of the holder we replaced
        self.behind_us = 0  # how far a former holder's timestamps ran ahead of our clock

    # -- taking it ------------------------------------------------------------------------

    async def try_acquire(self) -> Holder | None:
        """Take the lease if it is free or expired. Returns None on success, else the
        current holder."""
        holder = await self.table.read()
        now_us, started = self.clock.wall_us(), self.clock.monotonic()
        now_ms = now_us // 1000
        if self._seen[0] != holder:
            self._seen = (holder, started)  # answered after it was written: not earlier
        if holder is not None and holder.owner is not None and holder.expires_at_ms > now_ms:
            return holder
        floor = max(now_us, (holder.ts_ceiling + 1) if holder else 0)
        ceiling = floor + self._ceiling_span_us()
        expires = now_ms + int(self.ttl_s * 1000)
        epoch = 1 if holder is None else holder.epoch + 1
        try:
            if holder is None:
                applied = await self.table.create(self.owner, expires, ceiling)
            else:
                applied = await self.table.take(self.owner, epoch, expires, ceiling,
                                                holder.epoch, holder.expires_at_ms)
        except Exception as exc:
            if not cql.is_transient(exc):
                raise
            # A timed-out LWT may have been applied: the row says whose the lease is.
            current = await self.table.read()
            applied = current is not None and (current.owner, current.epoch) == (
                self.owner, epoch)
            if not applied:
                raise
        if not applied:
            return await self.table.read() or Holder(None, 0, 0, 0)
        self.epoch, self._ceiling, self._last_ts = epoch, ceiling, floor - 1
        self.behind_us = max(0, floor - now_us)
        self.took_over_expired = holder is not None and holder.owner is not None
        self._former_seen_at = self._seen[1]
        self._valid_until = started + self.ttl_s * VALID_SHARE
        self.held = True
        return None

    def takeover_wait_s(self, batchlog_s: float) -> float:
        """How long to wait before reading anything after this take, so that no batch of
        the former holder can still come out of a batchlog afterwards: none after a
        release; after an expired lease, until a full TTL plus `batchlog_s` after this
        worker first saw the holder's last renewal. The holder wrote nothing later than
        `VALID_SHARE` of the TTL after sending that renewal (before we saw it), and the
        take was applied only if no later renewal of its landed. Measured on this
        worker's monotonic clock, so it holds however far the hosts' clocks disagree."""
        if not self.took_over_expired:
            return 0.0
        quiet_for = self.clock.monotonic() - self._former_seen_at
        return max(0.0, self.ttl_s + batchlog_s - quiet_for)

    # -- holding it -----------------------------------------------------------------------

    def _ceiling_span_us(self) -> int:
        return int((self.ttl_s + 1.0) * 1_000_000)

    async def renew(self) -> bool:
        """Extend the lease. False: another worker took it (this one must stop writing at
        once). Raises on database errors, outcome unknown: validity then lapses by itself
        unless a later renewal succeeds."""
        started = self.clock.monotonic()
        now_us = self.clock.wall_us()
        # From our clock or from where our timestamps already are, whichever is later, so
        # a former holder's clock far ahead cannot leave us without timestamps.
        ceiling = max(self._ceiling, max(now_us, self._last_ts) + self._ceiling_span_us())
        expires = now_us // 1000 + int(self.ttl_s * 1000)
        applied = await self.table.renew(self.owner, self.epoch, expires, ceiling)
        if not applied or not self.valid:
            self.held = False
            self._valid_until = 0.0
            return False
        self._ceiling = ceiling
        self._valid_until = started + self.ttl_s * VALID_SHARE
        self.behind_us = max(0, self._last_ts - now_us)
        return True

    async def rotate(self) -> None:
        """A new writer session under the same hold: the next epoch. Raises LeaseLost if the
        lease is no longer ours."""
        started = self.clock.monotonic()
        now_us = self.clock.wall_us()
        ceiling = max(self._ceiling, max(now_us, self._last_ts) + self._ceiling_span_us())
        expires = now_us // 1000 + int(self.ttl_s * 1000)
        try:
            applied = await self.table.rotate(self.owner, self.epoch, self.epoch + 1, expires,
                                              ceiling)
        except Exception as exc:
            if not cql.is_transient(exc):
                raise
            current = await self.table.read()
            applied = current is not None and (current.owner, current.epoch) == (
                self.owner, self.epoch + 1)
            if not applied and current is not None and (current.owner, current.epoch) == (
                    self.owner, self.epoch):
                raise  # not applied: try again
        if not applied:
            self.held = False
            self._valid_until = 0.0
            raise LeaseLost(f"the lease is no longer held by {self.owner}")
        self.epoch += 1
        self._ceiling = ceiling
        self._valid_until = started + self.ttl_s * VALID_SHARE

    @property
    def valid(self) -> bool:
        if self.held and self.clock.monotonic() >= self._valid_until:
            # A lapse is final within a hold: a renewal answered later does not undo it
            # (whatever was dropped while it looked lapsed would be lost silently).
            self.held = False
        return self.held

    @property
    def valid_until(self) -> float:
        """Monotonic time at which validity lapses unless renewed."""
        return self._valid_until if self.held else 0.0

    def next_timestamp(self) -> int | None:
        """A write timestamp (µs) above every earlier one of this and former holders, or
        None while this worker may not write (lease not valid, or ceiling reached until
        the next renewal)."""
        if not self.valid:
            return None
        ts = max(self.clock.wall_us(), self._last_ts + 1)
        if ts > self._ceiling:
            return None
        self._last_ts = ts
        return ts

    async def release(self) -> None:
        """Give the lease up so a standby takes over at once; keeps the fencing ceiling."""
        if not self.held:
            return
        self.held = False
        # No write of ours will ever carry a later timestamp than the last one issued.
        await self.table.release(self.owner, self.epoch, self._last_ts)
