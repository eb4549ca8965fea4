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
