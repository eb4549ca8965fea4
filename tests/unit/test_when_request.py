"""What a `when` reads of the request line is what the routes matched, and a deny rule on it cannot be slipped
past by spelling the request another way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent import reasons as R
from agent.config import load_policy
from agent.decision import Decision, RequestView
from agent.engine import Engine
from tests.keys import SigningKey, mint

ROUTES = """\
deny:
  - {name: no-admin, when: 'request.path.startsWith("/admin")'}
routes:
  - name: admin
    match: {path: "/admin/**"}
    authn: [jwt]
    allow: {}
  - name: open
    match: {path: "/open/{name}"}
    authn: [jwt]
    allow: {when: 'request.path == "/open/" + params.name'}
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
