"""What a `when` reads of the request line is what the routes matched, and a deny rule on it cannot be slipped
past by spelling the request another way (percent-encoding, a padded query)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import reasons as R
from agent.config import load_policy
from agent.decision import Decision, RequestView
from agent.engine import Engine
from agent.policy.conditions import MAX_QUERY_PARAMETERS, Facts
from tests.keys import SigningKey, mint

ROUTES = """\
deny:
  - {name: no-admin, when: 'request.path.startsWith("/admin")'}
routes:
  - name: admin
    match: {path: "/admin/**"}
    authn: [jwt]
    allow: {}
  - name: q
    match: {path: /q}
    authn: [jwt]
    allow: {}
    deny: [{name: no-debug, when: '"debug" in request.query'}]
  - name: open
    match: {path: "/open/{name}"}
    authn: [jwt]
    allow: {when: '!("debug" in request.query) && request.path == "/open/" + params.name'}
"""


@pytest.fixture
async def engine(write_policy: Callable[..., Path]) -> Engine:
    e = Engine.for_policy(load_policy(write_policy(ROUTES)))
    for s in e.stores.values():
        assert await s.refresh()
    return e


async def ask(e: Engine, path: str, token: str) -> Decision:
    return await e.check(RequestView("GET", path, headers={"authorization": f"Bearer {token}"}, source="10.1.2.3"))


@pytest.mark.parametrize("path", ["/admin/x", "/%61dmin/x", "/%61%64%6d%69%6e/x", "/%41dmin/x"])
async def test_a_deny_rule_on_the_path_holds_however_the_path_is_encoded(
    engine: Engine, keys: dict[str, SigningKey], path: str
) -> None:
    d = await ask(engine, path, mint(keys["ES256"]))
    if path.startswith("/%41"):  # "/Admin/x": another path (paths are case-sensitive), no route
        assert d.reason == R.NO_ROUTE
        return
    assert (d.route, d.reason, d.deny_rule) == ("admin", R.DENIED_BY_RULE, "no-admin")


async def test_request_path_is_the_decoded_path_without_query_or_fragment(
    engine: Engine, keys: dict[str, SigningKey]
) -> None:
    token = mint(keys["ES256"])
    for path in ("/open/caf%C3%A9", "/open/café?x=1", "/open/caf%c3%a9#frag"):
        d = await ask(engine, path, token)
        assert (d.allowed, d.allow_index) == (True, 0), path


async def test_a_deny_rule_on_the_query_cannot_be_pushed_past_the_parameter_bound(
    engine: Engine, keys: dict[str, SigningKey]
) -> None:
    token = mint(keys["ES256"])
    assert (await ask(engine, "/q?debug=1", token)).reason == R.DENIED_BY_RULE
    assert (await ask(engine, "/q?a=1&b=2", token)).allowed
    padding = "&".join(f"p{i}=x" for i in range(MAX_QUERY_PARAMETERS))
    for query in (f"{padding}&debug=1", "&" * MAX_QUERY_PARAMETERS + "debug=1", f"{padding}&z=1"):
        d = await ask(engine, f"/q?{query}", token)
        assert (d.reason, d.deny_rule) == (R.DENIED_BY_RULE, "no-debug"), query
    # In an alternative, a query too long to read does not hold (never an allow).
    d = await ask(engine, f"/open/a?{padding}&debug=1", token)
    assert (d.status, d.reason) == (403, R.CONDITION_FAILED)
    # A fragment is not the query.
    assert (await ask(engine, "/q#?debug=1", token)).allowed


def test_reading_the_query_costs_no_more_than_its_bound() -> None:
    # 60 KiB of query (Envoy's default header limit) must not be parsed field by field on every decision.
    huge = "/q?" + "&".join("a%41=%41" for _ in range(7000))
    best = min(_variables_seconds(huge) for _ in range(3))
    assert best < 0.005, f"{best * 1e3:.1f} ms to build the variables of one request"


def _variables_seconds(path: str) -> float:
    start = time.perf_counter()
    variables = Facts(RequestView("GET", path), None, {}, 0.0).variables()
    seconds = time.perf_counter() - start
    assert variables["request"]["query"] is None
    return seconds
