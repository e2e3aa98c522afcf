"""Red team, the tenure's end: `Tenure.end` cancels the lease keeper and awaits it. The
keeper renews with `asyncio.wait_for(lease.renew(), ...)`, and CPython 3.11's wait_for
swallows a cancellation that arrives after the inner call finished but before wait_for
resumed (`except CancelledError: if fut.done(): return fut.result()`, gh-86296; the
project runs python:3.11-slim). The keeper then goes on renewing the lease for ever,
and `end()` waits for it for ever: the worker neither exits nor lets the lease expire,
and the standby never takes over.

Found by the random crash simulation, not by construction:
`SETTLER_SIM_SEED=2769547559 pytest tests/unit/test_simulation.py -k loses_acknowledged`
(two database kills then two worker kills; the new writer is in the restarted-node wait
when the final SIGTERM comes; its tenure's end never returns, its lease row is still
renewed 120 virtual seconds later, the simulation stops with "not done within 120.0
virtual seconds"). The test below makes the same interleaving deterministic on a real
asyncio loop: the SIGTERM's `end()` starts in the loop iteration in which a renewal's
answer completes. It failed before the fix (every bounded wait in settler now uses
`settler.timeouts.within`, which awaits in the task itself; ruff bans asyncio.wait_for).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from settler.store.lease import WriterLease
from settler.worker.tenure import Tenure
from tests.unit.test_lease import Row

TTL_S = 0.6  # renewals every 0.2 s


class AnsweringRow(Row):
    """A lease row that runs `on_answer` as a renewal's answer is being delivered."""

    def __init__(self) -> None:
        super().__init__()
        self.renewals = 0
        self.on_answer: Callable[[], None] | None = None

    async def renew(self, owner: str, epoch: int, expires_ms: int, ceiling: int) -> bool:
        self.renewals += 1
        applied = await super().renew(owner, epoch, expires_ms, ceiling)
        if self.on_answer is not None:
            hook, self.on_answer = self.on_answer, None
            hook()
        return applied


async def _end_during_a_renewal_answer(release: bool) -> tuple[bool, int, str | None]:
    row = AnsweringRow()
    stopping = asyncio.Event()
    tenure = Tenure(WriterLease(row, ttl_s=TTL_S), stopping, lambda exc: None)
    assert await tenure.acquire()
    ending: list[asyncio.Task[None]] = []

    def sigterm() -> None:
        # The worker's main task ends the tenure (SIGTERM, a session that ended) in the
        # same loop iteration as the renewal's answer arrives.
        stopping.set()
        ending.append(asyncio.ensure_future(tenure.end(release=release, timeout_s=1.0)))

    row.on_answer = sigterm
    await asyncio.sleep(TTL_S)  # the first renewal is sent at TTL/3
    assert ending, "no renewal was answered"
    done, _ = await asyncio.wait(ending, timeout=2.0)
    renewals = row.renewals
    await asyncio.sleep(1.0)
    renewed_after_end = row.renewals - renewals
    for task in ending:
        task.cancel()
    if tenure._keeper is not None:
        tenure._keeper.cancel()
    return bool(done), renewed_after_end, None if row.holder is None else row.holder.owner


@pytest.mark.parametrize("release", [True, False])
def test_a_tenure_ended_as_a_renewal_answers_stops_renewing(release: bool) -> None:
    """History: the keeper's renewal is answered; in the same loop iteration the worker
    ends the tenure (SIGTERM during the takeover or restarted-node wait, a session that
    ended LAPSED/FATAL/STOPPED: every `tenure.end` call). The cancel hits the keeper
    inside `wait_for` whose inner call is done: wait_for returns the renewal's result,
    the keeper loops on, `end()` awaits it for ever. With release=True the worker never
    exits after SIGTERM (until the supervisor's SIGKILL); with release=False (a FATAL
    session: exit 1 expected) the process hangs holding a lease it keeps renewing, so no
    standby ever takes over and nothing settles.

    Reachable: production runs CPython 3.11 (Dockerfile python:3.11-slim); the window
    is a loop iteration, and a plain random simulation seed hit it (module docstring)."""
    ended, renewed_after_end, owner = asyncio.run(_end_during_a_renewal_answer(release))
    assert ended, "tenure.end() did not return"
    assert renewed_after_end == 0, f"{renewed_after_end} renewals after the tenure ended"
    if release:
        assert owner is None, "the lease was not released"


@pytest.mark.parametrize("release", [True, False])
def test_control_a_tenure_ended_between_renewals_stops_renewing(release: bool) -> None:
    async def scenario() -> tuple[bool, int]:
        row = AnsweringRow()
        tenure = Tenure(WriterLease(row, ttl_s=TTL_S), asyncio.Event(), lambda exc: None)
        assert await tenure.acquire()
        await asyncio.sleep(TTL_S / 2)  # between two renewals
        await asyncio.wait_for(tenure.end(release=release, timeout_s=1.0), 2.0)
        renewals = row.renewals
        await asyncio.sleep(1.0)
        return True, row.renewals - renewals

    ended, renewed_after_end = asyncio.run(scenario())
    assert ended and renewed_after_end == 0
