"""Waiting for a condition with a deadline: tests never sleep a fixed time and hope (a loaded machine is slower)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

DEADLINE_S = 20.0


def until(check: Callable[[], object], what: str, timeout: float = DEADLINE_S) -> None:
    """Poll `check` until it is truthy; fail naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, f"not within {timeout} s: {what}"
        time.sleep(0.02)


async def until_async(check: Callable[[], Awaitable[object] | object], what: str, timeout: float = DEADLINE_S) -> None:
    """The same inside an event loop; `check` may be a coroutine function."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if isinstance(got, Awaitable):
            got = await got
        if got:
            return
        assert time.monotonic() < end, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)
