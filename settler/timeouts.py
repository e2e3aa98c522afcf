"""Bounded waits that stay cancellable.

CPython 3.11's `asyncio.wait_for` runs the awaited call as its own task and, when the
waiting task is cancelled in the loop iteration in which that call finished, returns the
call's result instead of raising (gh-86296, fixed in 3.12): the cancel is lost. A loop
that is stopped by cancelling it (the lease keeper, a session's helpers) then runs on.
`within` bounds a wait with `asyncio.timeout`, which awaits in the same task, so a cancel
is always delivered. `asyncio.wait_for` is banned in this package (ruff TID251).

Awaiting in the same task also delivers the cancel INTO the awaited code, and some
library code turns a cancellation into its own error (a Kafka client's connection error)
or swallows it. `within` therefore raises CancelledError whenever its task was cancelled
while it waited, whatever the awaited code made of it, as `wait_for` did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """`await awaitable`, raising TimeoutError once `seconds` have passed."""
    task = asyncio.current_task()
    cancels = task.cancelling() if task is not None else 0
    try:
        async with asyncio.timeout(max(0.0, seconds)):
            result = await awaitable
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        if task is not None and task.cancelling() > cancels:
            raise asyncio.CancelledError from exc  # a cancel the awaited code converted
        raise
    if task is not None and task.cancelling() > cancels:
        raise asyncio.CancelledError  # a cancel the awaited code swallowed
    return result
