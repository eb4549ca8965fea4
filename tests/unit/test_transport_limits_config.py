"""The rate-limited log line that bad requests cause."""

from __future__ import annotations

import logging

import pytest

from agent.server.ratelog import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_log_writes_one_line_a_second_per_kind_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("t"), every_s=1.0, clock=clock)
    with caplog.at_level(logging.WARNING, "t"):
        assert rl.warning("malformed", "bad one")
        assert not any(rl.warning("malformed", "bad one") for _ in range(99))
        assert rl.warning("connections", "other kind")  # kinds are limited separately
        clock.now += 1.0
        assert rl.warning("malformed", "bad one")
    assert [r.getMessage() for r in caplog.records] == [
        "bad one",
        "other kind",
        "bad one (99 more since the last such line)",
    ]
