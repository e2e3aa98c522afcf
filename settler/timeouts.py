"""Bounded waits that stay cancellable.

CPython 3.11's `asyncio.wait_for` runs the awaited call as its own task and, when the
waiting task is cancelled in the loop iteration in which that call finished, returns the
call's result instead of raising (gh-86296, fixed in 3.12): the cancel is lost. A loop
that is stopped by cancelling it (the lease keeper, a session's helpers) then runs on.
`within` bounds a wait with `asyncio.timeout`, which awaits in the same task, so a cancel
is always delivered. `asyncio.wait_for` is banned in this package (ruff TID251).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """`await awaitable`, raising TimeoutError once `seconds` have passed."""
    async with asyncio.timeout(max(0.0, seconds)):
        return await awaitable
