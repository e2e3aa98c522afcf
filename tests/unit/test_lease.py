"""The lease's own rules, over an in-memory lease row (its LWT semantics: applied or not,
or a timeout with an unknown outcome) and a clock the test moves."""

from __future__ import annotations

import asyncio

import pytest
from cassandra import WriteTimeout, WriteType

from settler.store.lease import VALID_SHARE, Holder, LeaseLost, WriterLease


class Clock:
    def __init__(self, wall_s: float = 1_800_000_000.0) -> None:
        self.mono = 100.0
        self.wall_s = wall_s

    def monotonic(self) -> float:
        return self.mono

    def wall_us(self) -> int:
        return int(self.wall_s * 1_000_000)

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall_s += seconds


class Row:
    """One writer_lease row; `lose_answers` makes the next LWTs apply, then time out."""

    def __init__(self, holder: Holder | None = None) -> None:
        self.holder = holder
        self.lose_answers = 0

    def _answer(self, applied: bool) -> bool:
        if self.lose_answers:
            self.lose_answers -= 1
            raise WriteTimeout("timed out", write_type=WriteType.CAS)
        return applied

    async def read(self) -> Holder | None:
        return self.holder

    async def create(self, owner: str, expires_ms: int, ceiling: int) -> bool:
        if self.holder is not None:
            return self._answer(False)
        self.holder = Holder(owner, 1, expires_ms, ceiling)
        return self._answer(True)

    async def take(self, owner: str, epoch: int, expires_ms: int, ceiling: int,
                   expected_epoch: int, expected_expires_ms: int) -> bool:
        if self.holder is None or (self.holder.epoch, self.holder.expires_at_ms) != (
                expected_epoch, expected_expires_ms):
            return self._answer(False)
        self.holder = Holder(owner, epoch, expires_ms, ceiling)
        return self._answer(True)

    async def renew(self, owner: str, epoch: int, expires_ms: int, ceiling: int) -> bool:
        held = self.holder
        if held is None or (held.owner, held.epoch) != (owner, epoch):
            return self._answer(False)
        self.holder = Holder(owner, epoch, expires_ms, ceiling)
        return self._answer(True)

    async def rotate(self, owner: str, epoch: int, new_epoch: int, expires_ms: int,
                     ceiling: int) -> bool:
        held = self.holder
        if held is None or (held.owner, held.epoch) != (owner, epoch):
            return self._answer(False)
        self.holder = Holder(owner, new_epoch, expires_ms, ceiling)
        return self._answer(True)

    async def release(self, owner: str, epoch: int, ceiling: int) -> bool:
        held = self.holder
        if held is None or (held.owner, held.epoch) != (owner, epoch):
            return False
        self.holder = Holder(None, epoch, 0, ceiling)
        return True


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_a_take_that_timed_out_but_was_applied_is_recognised_as_ours() -> None:
    clock = Clock()
    row = Row(Holder("dead-writer", 4, 0, 10))  # expired long ago
    row.lose_answers = 1
    lease = WriterLease(row, ttl_s=10, clock=clock, owner="me")

    assert run(lease.try_acquire()) is None
    assert (lease.epoch, lease.valid, lease.took_over_expired) == (5, True, True)


def test_a_take_that_timed_out_and_was_not_applied_is_an_error_not_a_success() -> None:
    clock = Clock()
    row = Row(Holder("dead-writer", 4, 0, 10))
    lease = WriterLease(row, ttl_s=10, clock=clock, owner="me")

    async def take_lost(*_: object) -> bool:
        raise WriteTimeout("timed out before it was applied", write_type=WriteType.CAS)

    row.take = take_lost  # type: ignore[method-assign]
    with pytest.raises(WriteTimeout):
        run(lease.try_acquire())
    assert not lease.held and row.holder == Holder("dead-writer", 4, 0, 10)


def test_validity_ends_at_its_share_of_the_ttl_after_the_renewal_was_sent() -> None:
    clock = Clock()
    lease = WriterLease(Row(), ttl_s=10, clock=clock, owner="me")
    assert run(lease.try_acquire()) is None
    clock.advance(10 * VALID_SHARE - 0.01)
    assert lease.valid and lease.next_timestamp() is not None
    assert run(lease.renew()) is True and lease.valid  # renewed in time: valid again
    clock.advance(10 * VALID_SHARE + 0.01)
    assert not lease.valid and lease.next_timestamp() is None


def test_a_lapse_is_final_even_if_a_renewal_answers_afterwards() -> None:
    """Red team: a renewal sent just before the deadline and answered after it must not
    bring validity back (what was dropped while it looked lapsed would be lost)."""
    clock = Clock()
    row = Row()
    lease = WriterLease(row, ttl_s=10, clock=clock, owner="me")
    assert run(lease.try_acquire()) is None
    clock.advance(10 * VALID_SHARE - 0.001)
    answered_late = row.renew

    async def slow_renew(*args: object) -> bool:
        clock.advance(0.01)  # the answer comes after the deadline
        return await answered_late(*args)  # type: ignore[arg-type]

    row.renew = slow_renew  # type: ignore[method-assign]
    assert run(lease.renew()) is False
    assert not lease.valid and lease.next_timestamp() is None


def test_a_former_writers_clock_far_ahead_never_stalls_the_next_one() -> None:
    clock = Clock()
    hour_ahead = clock.wall_us() + 3_600_000_000
    row = Row(Holder("ahead", 1, 0, hour_ahead))  # expired, its ceiling an hour ahead
    lease = WriterLease(row, ttl_s=10, clock=clock, owner="me")
    assert run(lease.try_acquire()) is None
    assert lease.behind_us >= 3_600_000_000 - 1_000_000
    first = lease.next_timestamp()
    assert first is not None and first > hour_ahead
    # As if a whole renewal's span of timestamps had been used by many writes:
    lease._last_ts = lease._ceiling
    assert lease.next_timestamp() is None  # until the next renewal extends the ceiling
    clock.advance(3.0)
    assert run(lease.renew()) is True
    following = lease.next_timestamp()
    assert following is not None and following > first


def test_a_rotation_raises_the_epoch_and_fails_once_another_worker_holds_it() -> None:
    clock = Clock()
    row = Row()
    lease = WriterLease(row, ttl_s=10, clock=clock, owner="me")
    assert run(lease.try_acquire()) is None
    run(lease.rotate())
    assert lease.epoch == 2 and row.holder is not None and row.holder.epoch == 2
    row.holder = Holder("other", 3, 0, 0)
    with pytest.raises(LeaseLost):
        run(lease.rotate())
    assert not lease.valid


def test_release_promises_no_timestamp_above_the_last_one_issued() -> None:
    clock = Clock()
    row = Row()
    lease = WriterLease(row, ttl_s=10, clock=clock, owner="me")
    assert run(lease.try_acquire()) is None
    last = lease.next_timestamp()
    run(lease.release())
    assert row.holder is not None and row.holder.owner is None
    assert row.holder.ts_ceiling == last


def test_a_renewal_landing_between_the_look_and_the_take_makes_the_take_fail() -> None:
    """The holder's clock runs behind ours, so its lease looks expired while it still
    renews. A renewal of its that lands after we read the row and before our take must
    make the take fail: a take conditioned on the epoch alone applied, with our ceiling
    computed from the stale row (below the holder's new one), so both would write and
    the holder's late cells could win over ours."""
    clock = Clock()
    behind_ms = 20_000  # the holder's expires_at, by its clock, is already past by ours
    expires = int(clock.wall_s * 1000) - behind_ms + 10_000
    row = Row(Holder("holder", 4, expires, 5_000))
    lease = WriterLease(row, ttl_s=10, clock=clock, owner="me")
    take = row.take

    async def renewed_first(*args: int | str) -> bool:
        assert await row.renew("holder", 4, expires + 3_333, 9_000_000_000_000_000)
        return await take(*args)  # type: ignore[arg-type]

    row.take = renewed_first  # type: ignore[method-assign]
    current = run(lease.try_acquire())
    assert not lease.held
    assert current == Holder("holder", 4, expires + 3_333, 9_000_000_000_000_000)


def test_after_an_expired_lease_the_wait_counts_from_first_sight_of_its_last_renewal() -> None:
    """Not from `expires_at` by our clock: a holder whose clock runs behind ours looks
    expired early, yet it may write until 80% of the TTL after that renewal, and its
    batchlog may replay later still. So: a full TTL plus the wait after we first saw it."""
    clock = Clock()
    behind_ms = 6_500
    expires = int(clock.wall_s * 1000) - behind_ms + 10_000  # 3.5 s left by our clock
    row = Row(Holder("holder", 4, expires, 5_000))
    lease = WriterLease(row, ttl_s=10, clock=clock, owner="me")
    assert run(lease.try_acquire()) is not None  # first sight: not expired yet by our clock
    clock.advance(3.6)
    assert run(lease.try_acquire()) is None and lease.took_over_expired
    assert lease.takeover_wait_s(15) == pytest.approx(10 + 15 - 3.6)
    clock.advance(30)
    assert lease.takeover_wait_s(15) == 0.0


def test_a_holder_seen_unchanged_for_long_needs_only_what_is_left_of_ttl_plus_wait() -> None:
    clock = Clock()
    row = Row(Holder("holder", 4, int(clock.wall_s * 1000) + 10_000, 5_000))
    lease = WriterLease(row, ttl_s=10, clock=clock, owner="me")
    assert run(lease.try_acquire()) is not None
    clock.advance(12)  # seen unchanged (no renewal) for 12 s; expired by our clock
    assert run(lease.try_acquire()) is None
    assert lease.takeover_wait_s(15) == pytest.approx(13)


def test_a_released_lease_needs_no_wait() -> None:
    clock = Clock()
    row = Row(Holder(None, 4, 0, 5_000))
    lease = WriterLease(row, ttl_s=10, clock=clock, owner="me")
    assert run(lease.try_acquire()) is None
    assert not lease.took_over_expired and lease.takeover_wait_s(15) == 0.0
