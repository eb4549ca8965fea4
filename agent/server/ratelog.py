"""Log lines a peer can cause at will: one line, at most one per interval and kind, with a count of the rest."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """The first event of a kind is logged at once; later ones within `every_s` are only counted, and the next
    line written says how many were left out, so a flood of bad requests cannot flood the log."""

    def __init__(
        self, logger: logging.Logger, every_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = logger
        self._every = every_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def warning(self, kind: str, message: str) -> bool:
        """Log `message` (one line, never request bytes) unless a `kind` line was written too recently.
        Returns whether it was written."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._every:
            self._left_out[kind] = self._left_out.get(kind, 0) + 1
            return False
        left_out = self._left_out.pop(kind, 0)
        suffix = f" ({left_out} more since the last such line)" if left_out else ""
        self._log.warning("%s%s", message, suffix)
        self._last[kind] = now
        return True
