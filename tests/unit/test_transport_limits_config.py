"""The limits of `authz-agent run` as an operator sets them, and the rate-limited log line bad requests cause."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.server.limits import TransportLimits, parse_bytes
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


@pytest.mark.parametrize(
    "text,value", [("16MiB", 16 << 20), ("16mb", 16 << 20), ("512KiB", 512 << 10), ("1GiB", 1 << 30), ("123", 123)]
)
def test_sizes_read_with_binary_units(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "MiB", "1.5MiB", "-1", "lots"])
def test_a_size_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_defaults_hold_the_largest_check_request() -> None:
    from agent.envoyconf import MAX_CHECK_REQUEST_BYTES

    d = TransportLimits()
    assert d.connection_buffer >= 4 * MAX_CHECK_REQUEST_BYTES and d.total_buffer >= 4 * d.connection_buffer
    # Envoy's ext_authz timeout: 2.4 s as envoy-config writes it without a policy (envoy/README.md "Timeouts")
    assert d.max_connections == 1024 and d.stream_timeout_s >= 4 * 2.4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_connections": 0},
        {"connection_buffer": 1 << 20},  # smaller than one CheckRequest of MAX_CHECK_REQUEST_BYTES
        {"connection_buffer": 2 << 30},
        {"connection_buffer": 1 << 30, "total_buffer": 1 << 30},  # its window, twice it, over 2^31-1
        {"total_buffer": 8 << 20},  # below the per-connection budget
        {"stream_timeout_s": 0},
        {"idle_timeout_s": -1},
        {"handshake_timeout_s": 0},
    ],
)
def test_limits_that_cannot_work_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TransportLimits(**kwargs)  # type: ignore[arg-type]


def test_run_refuses_a_bad_limit_with_a_message(write_policy: Callable[..., Path]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--policy", str(write_policy()), "--max-connection-buffer", "1MiB"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "per-connection buffer" in r.stderr and "Traceback" not in r.stderr


def test_the_largest_connection_buffer_has_a_window_http2_can_say() -> None:
    from agent.server.limits import MAX_CONNECTION_BUFFER

    assert 2 * MAX_CONNECTION_BUFFER == 2**31 - 2  # RFC 9113 6.9.1: a window is at most 2^31-1
    assert TransportLimits(connection_buffer=MAX_CONNECTION_BUFFER, total_buffer=MAX_CONNECTION_BUFFER)


def test_run_refuses_a_buffer_whose_window_http2_cannot_say(write_policy: Callable[..., Path]) -> None:
    # 1 GiB was accepted, its window (2 GiB) wrapped negative in the native transport and stayed 65535.
    r = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--policy", str(write_policy()), "--max-connection-buffer", "1GiB",
         "--max-buffer", "2GiB"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "window" in r.stderr and "1073741823" in r.stderr and "Traceback" not in r.stderr
