"""Anomaly alerts from the decision stream, with their thresholds, windows and cooldown."""

from __future__ import annotations

import pytest

from agent import reasons as R
from agent.audit.alerts import AlertMonitor
from agent.authn.principal import Principal
from agent.config import load_policy_text
from agent.config.model import AlertSettings
from agent.decision import Decision, RequestView
from agent.errors import ConfigErrors


def decision(allowed: bool, reason: str, who: Principal | None = None, route: str = "r") -> Decision:
    return Decision("id", allowed, 200 if allowed else 401, reason, "allow" if allowed else "deny", route, who)


def monitor(**settings: object) -> tuple[AlertMonitor, list[tuple[str, dict[str, object]]]]:
    raised: list[tuple[str, dict[str, object]]] = []
    return AlertMonitor(AlertSettings(**settings), lambda k, d: raised.append((k, d))), raised  # type: ignore[arg-type]


def test_failed_authentication_per_source_within_a_window_and_cooldown() -> None:
    m, raised = monitor(failed_authn=3, failed_authn_window_s=10, cooldown_s=100)
    view = RequestView("GET", "/", source="10.0.0.9")
    for t in (0.0, 1.0):
        m.observe(view, decision(False, R.TOKEN_SIGNATURE_INVALID), t)
    m.observe(RequestView("GET", "/", source="10.0.0.8"), decision(False, R.TOKEN_EXPIRED), 2.0)
    assert raised == []
    m.observe(view, decision(False, R.TOKEN_EXPIRED), 3.0)
    assert raised == [("failed_authentication", {"source": "10.0.0.9", "count": 3, "reason": R.TOKEN_EXPIRED})]
    for t in (4.0, 5.0, 6.0):
        m.observe(view, decision(False, R.TOKEN_EXPIRED), t)
    assert len(raised) == 1  # cooldown
    m.observe(view, decision(False, R.TOKEN_MISSING), 7.0)  # no credentials is not a failed authentication
    assert len(raised) == 1


def test_one_token_from_many_addresses() -> None:
    m, raised = monitor(token_spread_addresses=3, token_spread_window_s=60)
    who = Principal("alice", "https://idp", "jwt", jti="j-1")
    for i, source in enumerate(["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"]):
        m.observe(RequestView("GET", "/", source=source), decision(True, R.ALLOWED, who), float(i))
    assert raised == [
        (
            "token_from_many_addresses",
            {"jti": "j-1", "subject": "alice", "addresses": ["10.0.0.1", "10.0.0.2", "10.0.0.3"], "count": 3},
        )
    ]
    m2, raised2 = monitor(token_spread_addresses=2, token_spread_window_s=10)
    m2.observe(RequestView("GET", "/", source="10.0.0.1"), decision(True, R.ALLOWED, who), 0.0)
    m2.observe(RequestView("GET", "/", source="10.0.0.2"), decision(True, R.ALLOWED, who), 20.0)  # window over
    assert raised2 == []


def test_signature_failures_and_rate_limit_abuse() -> None:
    m, raised = monitor(signature_failures=2, rate_limited=2)
    view = RequestView("POST", "/", source="10.0.0.5")
    m.observe(view, decision(False, R.SIGNATURE_INVALID), 0.0)
    m.observe(view, decision(False, R.CONTENT_DIGEST_MISMATCH), 1.0)
    who = Principal("bob", "https://idp", "jwt", client_id="batch")
    m.observe(view, decision(False, R.RATE_LIMITED, who, "search"), 2.0)
    m.observe(view, decision(False, R.RATE_LIMITED, who, "search"), 3.0)
    kinds = [k for k, _ in raised]
    assert kinds == ["signature_failures", "rate_limit_abuse"]
    assert raised[1][1] == {"route": "search", "count": 2, "source": "10.0.0.5", "subject": "bob"}


def denied(status: int, reason: str, who: Principal | None, route: str = "r") -> Decision:
    return Decision("id", False, status, reason, "deny", route, who)


ALICE = Principal("alice", "https://idp", "jwt", client_id="web-app")


def test_authorization_failures_at_the_threshold_not_below_within_a_window() -> None:
    m, raised = monitor(authorization_failures=3, authorization_failures_window_s=10, cooldown_s=100)
    view = RequestView("GET", "/admin", source="10.0.0.9")
    m.observe(view, denied(403, R.SCOPE_MISSING, ALICE, "admin"), 0.0)
    m.observe(view, denied(403, R.ROLE_MISSING, ALICE, "users"), 1.0)
    assert raised == []  # n - 1
    m.observe(view, denied(403, R.SCOPE_MISSING, ALICE, "admin"), 2.0)
    assert raised == [
        (
            "authorization_failures",
            {
                "client_id": "web-app",
                "subject": "alice",
                "count": 3,
                "routes": ["admin", "users"],
                "reasons": [R.SCOPE_MISSING, R.ROLE_MISSING],
                "subjects": ["alice"],
                "source": "10.0.0.9",
            },
        )
    ]
    for t in (3.0, 4.0, 5.0, 40.0, 41.0, 42.0):
        m.observe(view, denied(403, R.SCOPE_MISSING, ALICE), t)
    assert len(raised) == 1  # cooldown, though a second window filled
    for t in (103.0, 104.0):
        m.observe(view, denied(403, R.SCOPE_MISSING, ALICE), t)
    assert len(raised) == 1  # after the cooldown, a fresh window: n - 1 again
    m.observe(view, denied(403, R.SCOPE_MISSING, ALICE), 105.0)
    assert len(raised) == 2 and raised[1][1]["count"] == 3

    m2, raised2 = monitor(authorization_failures=2, authorization_failures_window_s=10)
    m2.observe(view, denied(403, R.SCOPE_MISSING, ALICE), 0.0)
    m2.observe(view, denied(403, R.SCOPE_MISSING, ALICE), 10.0)  # the window has passed: counting restarts
    assert raised2 == []
    m2.observe(view, denied(403, R.SCOPE_MISSING, ALICE), 19.0)
    assert [k for k, _ in raised2] == ["authorization_failures"]


def test_authorization_failures_key_is_the_client_else_the_subject() -> None:
    m, raised = monitor(authorization_failures=2)
    view = RequestView("GET", "/", source="10.0.0.9")
    bob = Principal("bob", "https://idp", "jwt", client_id="web-app")
    m.observe(view, denied(403, R.CLAIM_MISMATCH, ALICE), 0.0)
    m.observe(view, denied(403, R.DENIED_BY_RULE, bob), 1.0)  # the same client id
    assert raised[0][1]["subjects"] == ["alice", "bob"] and raised[0][1]["client_id"] == "web-app"
    carol = Principal("carol", "https://idp", "jwt")
    dave = Principal("dave", "https://idp", "jwt")
    m.observe(view, denied(403, R.CONDITION_FAILED, carol), 2.0)
    m.observe(view, denied(403, R.CONDITION_FAILED, dave), 3.0)
    assert len(raised) == 1  # no client id: one each per subject
    m.observe(view, denied(403, R.GRANT_NOT_ACTIVE, carol), 4.0)
    assert raised[1][1]["client_id"] is None and raised[1][1]["subject"] == "carol"


def test_authorization_failures_count_403s_of_authenticated_callers_only() -> None:
    m, raised = monitor(authorization_failures=2, failed_authn=100, rate_limited=100)
    view = RequestView("GET", "/", source="10.0.0.9")
    for t in range(5):
        m.observe(view, denied(401, R.TOKEN_EXPIRED, None), float(t))
        m.observe(view, denied(401, R.STEP_UP_REQUIRED, ALICE), float(t))  # a rule's 401 asks for a new login
        m.observe(view, denied(429, R.RATE_LIMITED, ALICE), float(t))
        m.observe(view, denied(403, R.NO_ROUTE, None), float(t))  # refused before any credential is read
        m.observe(view, decision(True, R.ALLOWED, ALICE), float(t))
    assert raised == []


def test_authorization_failures_list_at_most_16_routes() -> None:
    m, raised = monitor(authorization_failures=40)
    view = RequestView("GET", "/", source="10.0.0.9")
    for i in range(40):
        m.observe(view, denied(403, R.SCOPE_MISSING, ALICE, f"route-{i}"), float(i) / 10)
    assert raised[0][1]["count"] == 40 and raised[0][1]["routes"] == [f"route-{i}" for i in range(16)]


def seen(m: AlertMonitor, source: str, t: float, who: Principal = ALICE, allowed: bool = True) -> None:
    m.observe(RequestView("GET", "/", source=source), decision(allowed, R.ALLOWED, who), t)


DAY = 86400.0


def test_new_source_network_first_network_learned_silently_the_next_raises() -> None:
    m, raised = monitor()
    seen(m, "10.1.2.3", 0.0)  # the first: nothing to compare it with
    seen(m, "10.1.2.200", 1.0)  # the same /24
    assert raised == []
    seen(m, "10.1.3.4", 2.0)
    assert raised == [
        (
            "new_source_network",
            {"client_id": "web-app", "subject": "alice", "network": "10.1.3.0/24", "known_networks": 1,
             "source": "10.1.3.4"},
        )
    ]  # fmt: skip
    seen(m, "10.1.3.9", 3.0)  # now known
    seen(m, "10.1.2.3", 4.0)
    assert len(raised) == 1
    # A refused request of the client counts too: a stolen credential is as often refused as not.
    bob = Principal("bob", "https://idp", "jwt", client_id="batch")
    seen(m, "10.9.9.9", 5.0, bob)
    m.observe(RequestView("GET", "/", source="10.8.8.8"), denied(403, R.SCOPE_MISSING, bob), 6.0)
    assert raised[-1][1]["client_id"] == "batch" and raised[-1][1]["network"] == "10.8.8.0/24"


def test_new_source_network_needs_a_client_id_and_an_address() -> None:
    m, raised = monitor()
    nobody = Principal("carol", "https://idp", "jwt")
    for i in range(3):
        seen(m, f"10.{i}.0.1", float(i), nobody)
        seen(m, "", float(i))
        seen(m, "/run/envoy.sock", float(i))
        m.observe(RequestView("GET", "/", source=f"10.{i}.0.1"), denied(401, R.TOKEN_EXPIRED, None), float(i))
    assert raised == []
    off, raised_off = monitor(new_source_network=False)
    seen(off, "10.1.0.1", 0.0)
    seen(off, "10.2.0.1", 1.0)
    assert raised_off == []


def test_new_source_network_ipv6_48_and_ipv4_mapped() -> None:
    m, raised = monitor(cooldown_s=0)
    seen(m, "2001:db8:1:2::5", 0.0)
    seen(m, "2001:db8:1:ffff::1", 1.0)  # the same /48
    assert raised == []
    seen(m, "2001:db8:2::1", 2.0)
    assert raised[-1][1]["network"] == "2001:db8:2::/48"
    seen(m, "::ffff:192.0.2.7", 3.0)
    assert raised[-1][1]["network"] == "192.0.2.0/24"
    seen(m, "192.0.2.99", 4.0)  # the same network, written as IPv4
    seen(m, "fe80::1%eth0", 5.0)
    assert [r[1]["network"] for r in raised] == ["2001:db8:2::/48", "192.0.2.0/24", "fe80::/48"]
    wide, raised_wide = monitor(new_source_network_ipv4_prefix=16, new_source_network_ipv6_prefix=32)
    seen(wide, "10.1.2.3", 0.0)
    seen(wide, "10.1.200.3", 1.0)
    seen(wide, "2001:db8:1::1", 2.0)
    seen(wide, "2001:db8:2::1", 3.0)
    assert [r[1]["network"] for r in raised_wide] == ["2001:db8::/32"]


def test_new_source_network_forgets_after_days_and_cooldown_per_client() -> None:
    m, raised = monitor(new_source_network_days=7, cooldown_s=300)
    seen(m, "10.1.0.1", 0.0)
    seen(m, "10.2.0.1", 1.0)
    seen(m, "10.3.0.1", 2.0)  # learned, but within the cooldown of this client's last alert
    assert [r[1]["network"] for r in raised] == ["10.2.0.0/24"]
    seen(m, "10.1.0.1", 6 * DAY)  # seen again: remembered 7 more days
    seen(m, "10.1.0.1", 12 * DAY)
    seen(m, "10.2.0.1", 12 * DAY + 1)  # last seen 12 days ago: forgotten, so new again
    assert [r[1]["network"] for r in raised] == ["10.2.0.0/24", "10.2.0.0/24"]
    assert raised[-1][1]["known_networks"] == 1  # 10.3 was forgotten too
    seen(m, "10.1.0.1", 40 * DAY)  # every network forgotten: learned silently, as a first
    assert len(raised) == 2


def test_new_source_network_memory_is_bounded() -> None:
    m, raised = monitor(cooldown_s=0)
    m2 = AlertMonitor(AlertSettings(cooldown_s=0), lambda k, d: raised.append((k, d)), max_clients=3, max_networks=4)
    for i in range(4):
        seen(m2, f"10.{i}.0.1", float(i))
    assert len(raised) == 3
    seen(m2, "10.9.0.1", 10.0)  # a fifth: the least recently seen (10.0) goes
    assert raised[-1][1]["known_networks"] == 4
    seen(m2, "10.0.0.1", 11.0)  # so it is new again
    assert len(raised) == 5 and raised[-1][1]["network"] == "10.0.0.0/24"
    seen(m2, "10.9.0.1", 12.0)  # kept
    assert len(raised) == 5
    # Clients: the least recently seen goes first, and its networks with it.
    for name in ("a", "b", "c"):
        seen(m2, "10.50.0.1", 20.0, Principal(name, "https://idp", "jwt", client_id=name))
    seen(m2, "10.51.0.1", 21.0, Principal("a", "https://idp", "jwt", client_id="a"))  # a is kept: seen lately
    assert raised[-1][1]["client_id"] == "a"
    seen(m2, "10.0.0.1", 22.0)  # web-app was the least recently seen of four: forgotten, so learned silently
    assert raised[-1][1]["client_id"] == "a"
    assert m.settings.new_source_network  # on by default


HEAD = "version: 1\nservice: orders\nroutes:\n  - {name: r, match: {path: /}, public: true}\nalerts:\n"


def load_errors(alerts: str) -> list[str]:
    with pytest.raises(ConfigErrors) as e:
        load_policy_text(HEAD + alerts, "p.yaml")
    return [f"{err.file}:{err.line}: {err.message}" for err in e.value.errors]


def test_the_new_alert_settings_load_with_their_defaults() -> None:
    base = load_policy_text(HEAD + "  cooldown_s: 60\n", "p.yaml").alerts
    assert (base.authorization_failures, base.authorization_failures_window_s) == (20, 60.0)
    assert base.new_source_network and base.new_source_network_days == 7.0
    assert (base.new_source_network_ipv4_prefix, base.new_source_network_ipv6_prefix) == (24, 48)
    text = (
        "  authorization_failures: {count: 5, window_s: 30}\n"
        "  new_source_network: {days: 30, ipv4_prefix: 16, ipv6_prefix: 56}\n"
    )
    a = load_policy_text(HEAD + text, "p.yaml").alerts
    assert (a.authorization_failures, a.authorization_failures_window_s) == (5, 30.0)
    assert (a.new_source_network, a.new_source_network_days) == (True, 30.0)
    assert (a.new_source_network_ipv4_prefix, a.new_source_network_ipv6_prefix) == (16, 56)
    assert not load_policy_text(HEAD + "  new_source_network: false\n", "p.yaml").alerts.new_source_network
    off = load_policy_text(HEAD + "  new_source_network: {enabled: false, days: 2}\n", "p.yaml").alerts
    assert not off.new_source_network and off.new_source_network_days == 2.0


def test_bad_new_alert_settings_are_refused_with_file_and_line() -> None:
    assert load_errors("  cooldown_s: 60\n  authorization_failures: {count: 0}\n") == [
        "p.yaml:7: alerts.authorization_failures.count must be at least 1, got 0"
    ]
    assert load_errors("  authorization_failures: {counts: 3}\n") == [
        "p.yaml:6: alerts.authorization_failures: unknown key 'counts'; did you mean 'count'?"
    ]
    assert load_errors("  authorization_failure: {count: 3}\n") == [
        "p.yaml:6: alerts: unknown key 'authorization_failure'; did you mean 'authorization_failures'?"
    ]
    assert load_errors("  new_source_network: yes please\n") == [
        "p.yaml:6: alerts.new_source_network must be true, false or a mapping, got 'yes please'"
    ]
    assert load_errors("  new_source_network:\n    days: 0.5\n    ipv4_prefix: 33\n    ipv6_prefix: 8\n") == [
        "p.yaml:7: alerts.new_source_network.days must be at least 1, got 0.5",
        "p.yaml:8: alerts.new_source_network.ipv4_prefix must be an integer from 8 to 32, got 33",
        "p.yaml:9: alerts.new_source_network.ipv6_prefix must be an integer from 16 to 128, got 8",
    ]
    assert load_errors("  new_source_network: {enabled: 1, ipv6_prefix: 48.0, window: 3}\n") == [
        "p.yaml:6: alerts.new_source_network: unknown key 'window'; allowed keys: days, enabled, ipv4_prefix, "
        "ipv6_prefix",
        "p.yaml:6: alerts.new_source_network.enabled must be true or false, got 1",
        "p.yaml:6: alerts.new_source_network.ipv6_prefix must be an integer, got 48.0",
    ]
