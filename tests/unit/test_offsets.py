"""Offset tracking (settler.core.offsets): what may be committed, whatever order batches
land in, and never a position the group has passed already."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from settler.core.offsets import Offsets

P = "t:0"


def test_commits_up_to_the_highest_contiguous_settled_offset() -> None:
    offsets: Offsets[str] = Offsets()
    for offset in (10, 11, 12, 13):
        offsets.track(P, offset)
    offsets.settle(P, 12)
    assert offsets.commit_ready() == {}
    offsets.settle(P, 10)
    assert offsets.commit_ready() == {P: 11}
    offsets.settle(P, 11)
    assert offsets.commit_ready() == {P: 13}
    offsets.committed({P: 13})
    assert offsets.commit_ready() == {}
    assert offsets.in_flight() == 1


def test_offsets_must_be_tracked_in_order() -> None:
    offsets: Offsets[str] = Offsets()
    offsets.track(P, 5)
    with pytest.raises(ValueError, match="out of order"):
        offsets.track(P, 5)


def test_a_partition_reread_from_below_its_commit_never_moves_the_commit_back() -> None:
    """A session that starts below the group's committed offset (the database did not
    confirm those effects) commits nothing until it passes that offset."""
    offsets: Offsets[str] = Offsets()
    offsets.assigned(P, 100)
    for offset in range(90, 103):
        offsets.track(P, offset)
    for offset in range(90, 100):
        offsets.settle(P, offset)
    assert offsets.commit_ready() == {}, "committing 100 again, or below it, moves nothing on"
    offsets.settle(P, 100)
    assert offsets.commit_ready() == {P: 101}


def test_revoked_partitions_are_forgotten_and_late_settles_ignored() -> None:
    offsets: Offsets[str] = Offsets()
    offsets.track(P, 1)
    offsets.forget([P])
    offsets.settle(P, 1)
    assert offsets.commit_ready() == {}
    assert offsets.in_flight() == 0


@settings(max_examples=300, deadline=None)
@given(
    start=st.integers(0, 50),
    committed=st.one_of(st.none(), st.integers(0, 80)),
    count=st.integers(1, 60),
    data=st.data(),
)
def test_commit_ready_is_the_contiguous_prefix_and_moves_only_forward(
    start: int, committed: int | None, count: int, data: st.DataObject
) -> None:
    """Settled in any order: the ready position is one past the longest settled prefix,
    never at or below the group's committed offset, and never decreases."""
    offsets: Offsets[str] = Offsets()
    offsets.assigned(P, committed)
    tracked = list(range(start, start + count))
    for offset in tracked:
        offsets.track(P, offset)
    order = data.draw(st.permutations(tracked))
    settled: set[int] = set()
    last = committed
    for offset in order:
        offsets.settle(P, offset)
        settled.add(offset)
        prefix = start
        while prefix in settled:
            prefix += 1
        ready = offsets.commit_ready().get(P)
        expected = prefix if prefix > start and (committed is None or prefix > committed) \
            else None
        if expected is not None and last is not None and expected <= last:
            expected = None
        assert ready == expected
        if ready is not None:
            offsets.committed({P: ready})
            last = ready
    assert offsets.in_flight() == 0
