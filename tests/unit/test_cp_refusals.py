"""The control plane's refusals: every one counted and listed, the log bounded per peer, a peer's text escaped."""

from __future__ import annotations

import logging

import pytest

from agent.controlplane.tls import REFUSAL_LOG_S, Refusals


def test_a_flood_of_refusals_is_counted_in_full_and_logged_once_per_peer_and_minute(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr("agent.controlplane.tls.time.monotonic", lambda: now[0])
    r = Refusals()
    with caplog.at_level(logging.WARNING, logger="agent.controlplane"):
        for port in range(40000, 40500):  # a scan from one host, every connection from a new port
            r.add("handshake_failed", f"10.0.0.9:{port}", None, None, "no TLS", "sync")
        r.add("handshake_failed", "10.0.0.8:1", None, None, "no TLS", "sync")  # another host: its own line
        r.add("no_certificate", "10.0.0.9:2", None, None, "no client certificate", "sync")  # another reason too
        assert len(caplog.records) == 3
        now[0] += REFUSAL_LOG_S
        r.add("handshake_failed", "10.0.0.9:3", None, None, "no TLS", "sync")
    assert r.counts["handshake_failed"] == 502 and r.counts["no_certificate"] == 1
    assert len(r.status()["last"]) == 50
    assert "499 more from there in the last minute" in caplog.records[-1].getMessage()


def test_the_service_a_peer_names_cannot_forge_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    r = Refusals()
    with caplog.at_level(logging.WARNING, logger="agent.controlplane"):
        r.add("service_not_allowed", "127.0.0.1:5", "spiffe://x/a", "billing\nINFO forged line" + "x" * 500, "", "sync")
    message = caplog.records[-1].getMessage()
    assert "\n" not in message and "billing\\nINFO forged line" in message and len(message) < 400
    assert r.status()["last"][-1]["service"].startswith("billing\\n")


def test_limits_fit_under_the_fd_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.controlplane import tls

    for soft in (256, 1024, 20000, 1 << 20):
        monkeypatch.setattr(tls.resource, "getrlimit", lambda _, soft=soft: (soft, soft))
        limits = tls.front_limits(2)
        used = 2 * (limits.handshakes + tls.FDS_PER_CONNECTION * limits.connections) + tls.FD_RESERVE
        assert used <= soft, (soft, limits)
        assert limits.handshakes_per_host <= limits.handshakes <= tls.MAX_HANDSHAKES
        assert limits.connections_per_identity <= limits.connections <= tls.MAX_CONNECTIONS
    assert tls.front_limits(2) == tls.FrontLimits()  # a high limit: the caps as documented


def test_a_host_is_its_address_or_its_ipv6_64() -> None:
    from agent.controlplane.tls import source_of

    assert source_of("10.0.0.9") == "10.0.0.9"
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_of("::ffff:10.0.0.9") == "10.0.0.9"


def test_printable_bounds_what_is_shown_escapes_included() -> None:
    from agent.controlplane.tls import _printable

    assert _printable("ok") == "ok"
    assert _printable("\n" * 1000, 20) == "\\n" * 10 + "..."
    assert len(_printable("x" * 5000, 1024)) == 1027


async def test_accept_failures_are_logged_once_a_minute_with_a_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accept() failing (EMFILE) is retried every 0.1 s: the log says so once a minute, not ten times a second."""
    import asyncio
    import errno
    import socket

    from agent.controlplane.tls import TlsFront
    from tests.wait import until_async

    front = TlsFront("127.0.0.1:0", lambda: None, Refusals(), "sync")  # type: ignore[arg-type,return-value]
    loop = asyncio.get_running_loop()

    async def failing_accept(_: socket.socket) -> tuple[socket.socket, object]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(loop, "sock_accept", failing_accept)
    with caplog.at_level(logging.ERROR, logger="agent.controlplane"), socket.socket() as sock:
        task = loop.create_task(front._accept_loop(sock))
        await until_async(lambda: front.accept_errors >= 8, "8 accept failures")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "Too many open files" in lines[0]


def test_a_serial_is_shown_as_one_number_whatever_its_leading_byte() -> None:
    from agent.controlplane.tls import _serial

    # ssl pads to whole bytes ("0D1B..."): one serial in 16 starts with a zero nibble, and must read the same
    assert _serial("0D1BF753") == format(0x0D1BF753, "X") == "D1BF753"
    assert _serial("") == "" and _serial("00") == "0"
