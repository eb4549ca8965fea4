"""Anomaly alerts from the decision stream, with their thresholds, windows and cooldown."""

from __future__ import annotations

from agent import reasons as R
from agent.audit.alerts import AlertMonitor
from agent.authn.principal import Principal
from agent.config.model import AlertSettings
from agent.decision import Decision, RequestView


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
