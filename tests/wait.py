"""Waiting for a condition with a deadline: tests never sleep a fixed time and hope (a loaded machine is slower)."""

from __future__ import annotations

import asyncio
import queue
import subprocess
import threading
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


def stderr_line(proc: subprocess.Popen[str], text: str, timeout: float = DEADLINE_S) -> str:
    """The first line of `proc`'s stderr (a text pipe) holding `text`, read as it is written; fails at the
    deadline or when the process exits without it (the lines so far in the message)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    end = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no line with {text!r} within {timeout} s; stderr so far: {seen}") from None
        if line is None:
            raise AssertionError(f"exited ({proc.wait()}) without a line with {text!r}: {seen}")
        seen.append(line)
        if text in line:
            return line
