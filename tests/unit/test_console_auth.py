"""The console's login and sessions, piece by piece, against the real demo IdP over loopback HTTP: the state is
single use and expires, the browser that started a login must finish it, the ID token is verified (signature by
the issuer's JWKS only, aud, typ, nonce), roles map as configured, sessions expire (idle, absolute) and are
bounded; the IdP's /token checks PKCE and binds a code to its client and redirect URI, once; a viewer gets 403
on an admin write; what agents report is escaped on the Fleet page; a missing console extra is said in one line."""

from __future__ import annotations

import base64
import hashlib
import secrets
import sys
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc import jwt
from joserfc.jwk import OctKey

from agent import cli
from agent.controlplane.console import ConsoleConfig
from agent.controlplane.console.auth import (
    ABSOLUTE_S,
    IDLE_S,
    MAX_PENDING,
    MAX_PENDING_PER_SOURCE,
    SESSION_COOKIE,
    STATE_TTL_S,
    LoginError,
    LoginFlow,
    Sessions,
    User,
    roles_of,
)
from agent.controlplane.server import AgentInfo, ControlPlane
from agent.demo.idp import LocalIdP, _new_key
from tests.console_http import console_client, http_login

CLIENT_ID = "authz-console"
REDIRECT = "http://127.0.0.1:1/ui/callback"
ADA = User("ada", "Ada", frozenset({"admin", "viewer"}))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sessions_end_when_idle_or_old_and_are_bounded() -> None:
    clock = Clock()
    sessions = Sessions(clock, max_sessions=3)
    sid, session = sessions.create(ADA)
    assert len(sid) >= 43 and len(session.csrf) >= 43
    assert sid not in repr(sessions._by_digest)  # kept by its hash only
    clock.now += IDLE_S - 1
    assert sessions.get(sid) is session  # used: idle time starts again
    clock.now += IDLE_S - 1
    assert sessions.get(sid) is session
    clock.now += IDLE_S + 1
    assert sessions.get(sid) is None and len(sessions) == 0
    sid, _ = sessions.create(ADA)
    for _ in range(int(ABSOLUTE_S // (IDLE_S / 2)) + 1):  # used every quarter hour, still ends after 8 h
        clock.now += IDLE_S / 2
        if sessions.get(sid) is None:
            break
    assert sessions.get(sid) is None
    assert clock.now - 1000.0 > ABSOLUTE_S
    ids = [sessions.create(ADA)[0] for _ in range(4)]
    assert len(sessions) == 3 and sessions.get(ids[0]) is None and sessions.get(ids[3]) is not None
    sessions.delete(ids[3])
    assert sessions.get(ids[3]) is None
    assert sessions.get(None) is None and sessions.get("x" * 500) is None


def test_roles_from_a_list_or_a_string_admin_over_viewer() -> None:
    config = ConsoleConfig("https://idp", "c", roles_claim="groups", admin_role="ops", viewer_role="dev")
    assert roles_of({"groups": ["dev"]}, config) == {"viewer"}
    assert roles_of({"groups": "x ops dev"}, config) == {"admin", "viewer"}
    assert roles_of({"groups": ["op", "devs"], "roles": ["ops"]}, config) == frozenset()
    assert roles_of({"groups": [1, None]}, config) == frozenset()
    assert roles_of({}, config) == frozenset()


@pytest.fixture
async def idp() -> AsyncIterator[LocalIdP]:
    provider = LocalIdP()
    await provider.start()
    provider.demo_users()
    provider.register_client(CLIENT_ID, [REDIRECT])
    try:
        yield provider
    finally:
        await provider.stop()


async def _authorize(idp: LocalIdP, url: str, user: str = "ada") -> dict[str, str]:
    """The IdP's login form posted for `user`: the callback's query (code, state)."""
    form = dict(parse_qsl(urlsplit(url).query))
    data = {**form, "user": user, "password": idp.users[user].password}
    async with aiohttp.ClientSession() as http, http.post(idp.issuer + "/authorize", data=data,
                                                          allow_redirects=False) as r:  # fmt: skip
        assert r.status == 303, await r.text()
        location = r.headers["Location"]
    assert location.startswith(REDIRECT + "?")
    return dict(parse_qsl(urlsplit(location).query))


def _flow(idp: LocalIdP, clock: Any = time.time) -> LoginFlow:
    return LoginFlow(ConsoleConfig(idp.issuer, CLIENT_ID), lambda: REDIRECT, clock)


async def test_a_login_succeeds_once_from_the_browser_that_started_it(idp: LocalIdP) -> None:
    flow = _flow(idp)
    try:
        url, binding = await flow.begin()
        query = dict(parse_qsl(urlsplit(url).query))
        assert query["code_challenge_method"] == "S256" and query["redirect_uri"] == REDIRECT
        assert "openid" in query["scope"].split()
        back = await _authorize(idp, url)
        with pytest.raises(LoginError, match="another browser"):
            await flow.finish(back["state"], back["code"], "someone-elses-cookie")
        # That attempt is spent: state is single use even when the first try failed.
        with pytest.raises(LoginError, match="unknown or expired"):
            await flow.finish(back["state"], back["code"], binding)
        url, binding = await flow.begin()
        back = await _authorize(idp, url)
        user = await flow.finish(back["state"], back["code"], binding)
        assert user == User("ada", "Ada Lovelace", frozenset({"admin", "viewer"}))
        with pytest.raises(LoginError, match="unknown or expired"):
            await flow.finish(back["state"], back["code"], binding)
    finally:
        await flow.close()


async def test_a_login_not_finished_in_ten_minutes_is_forgotten(idp: LocalIdP) -> None:
    clock = Clock()
    clock.now = time.time()
    flow = _flow(idp, clock)
    try:
        url, binding = await flow.begin()
        back = await _authorize(idp, url)
        clock.now += STATE_TTL_S + 1
        with pytest.raises(LoginError, match="unknown or expired"):
            await flow.finish(back["state"], back["code"], binding)
    finally:
        await flow.close()


async def test_a_flood_of_login_starts_from_one_source_does_not_push_out_anothers_login(idp: LocalIdP) -> None:
    """Before: 1000 GETs of /ui/login/start from anywhere pushed every other browser's pending login out (the
    global cap dropped the oldest), so its callback failed. Now a source beyond its cap loses its own oldest."""
    flow = _flow(idp)
    try:
        url, binding = await flow.begin("192.0.2.7")
        for _ in range(MAX_PENDING + 10):  # more than the whole table, from one place
            await flow.begin("203.0.113.9")
        assert len(flow._pending) <= MAX_PENDING_PER_SOURCE + 1
        back = await _authorize(idp, url)
        assert (await flow.finish(back["state"], back["code"], binding)).subject == "ada"
        # The flooding source keeps only its newest attempts, and a finished one leaves no trace of its source.
        assert set(flow._by_source) == {"203.0.113.9"}
        assert len(flow._by_source["203.0.113.9"]) == MAX_PENDING_PER_SOURCE
    finally:
        await flow.close()


def _id_claims(idp: LocalIdP, nonce: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": idp.issuer, "sub": "ada", "aud": CLIENT_ID, "iat": now, "exp": now + 300, "nonce": nonce,
              "name": "Ada", "roles": ["authz-admin"]}  # fmt: skip
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("nonce", "nonce mismatch"),
        ("aud", "token_audience_mismatch"),
        ("expired", "token_expired"),
        ("iss", "token_issuer_unknown"),
        ("foreign-key", "token_"),
        ("hs256", "token_alg_not_allowed"),
        ("access-token", "token_typ"),
        ("azp", "azp"),
    ],
)
async def test_an_id_token_that_fails_a_check_logs_nobody_in(idp: LocalIdP, case: str, message: str) -> None:
    flow = _flow(idp)
    try:
        url, binding = await flow.begin()
        state = dict(parse_qsl(urlsplit(url).query))["state"]
        nonce = flow._pending[state].nonce
        key, header = idp.keys[0], {"alg": idp.alg, "typ": "JWT", "kid": "key-1"}
        claims = _id_claims(idp, nonce)
        if case == "nonce":
            claims = _id_claims(idp, "another-login")
        elif case == "aud":
            claims = _id_claims(idp, nonce, aud="another-client")
        elif case == "expired":
            claims = _id_claims(idp, nonce, iat=int(time.time()) - 900, exp=int(time.time()) - 600)
        elif case == "iss":
            claims = _id_claims(idp, nonce, iss="https://evil.example")
        elif case == "foreign-key":
            key = _new_key(idp.alg, "key-1")  # same kid, not the issuer's key
        elif case == "access-token":
            header["typ"] = "at+jwt"
        elif case == "azp":
            claims = _id_claims(idp, nonce, aud=[CLIENT_ID, "other"], azp="other")
        if case == "hs256":
            secret = OctKey.import_key(secrets.token_bytes(32))
            token = jwt.encode({"alg": "HS256", "typ": "JWT"}, claims, secret, algorithms=["HS256"])
        else:
            token = jwt.encode(header, claims, key, algorithms=[idp.alg])

        async def exchange(endpoint: str, code: str, verifier: str) -> str:
            return token

        flow._exchange = exchange  # type: ignore[method-assign]
        with pytest.raises(LoginError, match=message):
            await flow.finish(state, "code", binding)
    finally:
        await flow.close()


async def _token(idp: LocalIdP, **form: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(idp.issuer + "/token", data=form) as r:
        return r.status, await r.json()


def _challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


async def _code(idp: LocalIdP, verifier: str, **params: str) -> str:
    query = {"client_id": CLIENT_ID, "redirect_uri": REDIRECT, "response_type": "code", "scope": "openid",
             "state": "s", "nonce": "n", "code_challenge": _challenge(verifier), "code_challenge_method": "S256",
             **params}  # fmt: skip
    back = await _authorize(idp, f"{idp.issuer}/authorize?{urlencode(query)}")
    return back["code"]


async def test_the_idp_token_endpoint_checks_pkce_client_redirect_and_use(idp: LocalIdP) -> None:
    verifier = secrets.token_urlsafe(32)
    good = {"grant_type": "authorization_code", "client_id": CLIENT_ID, "redirect_uri": REDIRECT,
            "code_verifier": verifier}  # fmt: skip
    code = await _code(idp, verifier)
    assert await _token(idp, **{**good, "code": code, "code_verifier": "wrong"}) == (400, {"error": "invalid_grant"})
    assert (await _token(idp, **good, code=code))[0] == 400  # a failed try spent it
    code = await _code(idp, verifier)
    assert (await _token(idp, **{**good, "redirect_uri": REDIRECT + "x"}, code=code))[0] == 400
    idp.register_client("other", [REDIRECT])
    code = await _code(idp, verifier)
    assert (await _token(idp, **{**good, "client_id": "other"}, code=code))[0] == 400
    code = await _code(idp, verifier)
    next(iter(idp._codes.values())).issued -= 61  # a minute old
    assert (await _token(idp, **good, code=code))[0] == 400
    code = await _code(idp, verifier)
    status, body = await _token(idp, **good, code=code)
    assert status == 200 and body["id_token"].count(".") == 2
    assert (await _token(idp, **good, code=code))[0] == 400  # single use


async def test_the_idp_never_redirects_to_an_unregistered_uri(idp: LocalIdP) -> None:
    query = {"client_id": CLIENT_ID, "redirect_uri": "https://evil.example/cb", "response_type": "code",
             "scope": "openid", "code_challenge": "x", "code_challenge_method": "S256"}  # fmt: skip
    async with aiohttp.ClientSession() as http:
        async with http.get(idp.issuer + "/authorize", params=query, allow_redirects=False) as r:
            assert r.status == 400 and "not registered" in await r.text()
        async with http.get(idp.issuer + "/authorize", params={**query, "redirect_uri": REDIRECT,
                            "code_challenge_method": "plain"}, allow_redirects=False) as r:  # fmt: skip
            assert r.status == 400 and "S256" in await r.text()


async def test_a_confidential_client_must_authenticate(idp: LocalIdP) -> None:
    idp.register_client(CLIENT_ID, [REDIRECT], secret="s3cret-of-the-console")
    verifier = secrets.token_urlsafe(32)
    code = await _code(idp, verifier)
    form = {"grant_type": "authorization_code", "client_id": CLIENT_ID, "redirect_uri": REDIRECT,
            "code_verifier": verifier, "code": code}  # fmt: skip
    assert (await _token(idp, **form))[0] == 401
    flow = LoginFlow(ConsoleConfig(idp.issuer, CLIENT_ID, client_secret="s3cret-of-the-console"), lambda: REDIRECT)
    try:
        url, binding = await flow.begin()
        back = await _authorize(idp, url, "vic")
        assert (await flow.finish(back["state"], back["code"], binding)).roles == {"viewer"}
    finally:
        await flow.close()


# -- the application: roles on routes, escaping, the page list ------------------------------------------------


@pytest.fixture
async def plane(idp: LocalIdP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ControlPlane]:
    """A plain-text control plane with the console and one extra page module with an admin-only write."""
    page = types.ModuleType("agent.controlplane.console.testpage")

    def setup(app: web.Application) -> None:
        from agent.controlplane.console.app import NAV, NavItem, requires

        @requires("admin")
        async def act(request: web.Request) -> web.Response:
            return web.Response(text="done")

        app.router.add_post("/act", act)
        app[NAV].append(NavItem("/ui/act", "Act", "admin"))

    page.setup = setup  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "agent.controlplane.console.testpage", page)
    monkeypatch.setattr("agent.controlplane.console.app.PAGES", ("fleet", "testpage", "policies"))
    (tmp_path / "orders.yaml").write_text("version: 1\nservice: orders\nroutes:\n"
                                          "  - {name: h, match: {path: /h}, public: true}\n")  # fmt: skip
    cp = ControlPlane(tmp_path, Ed25519PrivateKey.generate(), "127.0.0.1:0", "127.0.0.1:0",
                      console=ConsoleConfig(idp.issuer, CLIENT_ID))  # fmt: skip
    await cp.start()
    idp.register_client(CLIENT_ID, [f"http://127.0.0.1:{cp.admin_port}/ui/callback"])
    try:
        yield cp
    finally:
        await cp.stop()


async def test_a_viewer_is_refused_an_admin_write_even_with_a_good_form(plane: ControlPlane, idp: LocalIdP) -> None:
    base = f"http://127.0.0.1:{plane.admin_port}"
    for user, status, nav in (("vic", 403, False), ("ada", 200, True)):
        async with console_client() as http:
            csrf = await http_login(http, base, idp, user, idp.users[user].password)
            async with http.get(base + "/ui/") as r:
                assert ('href="/ui/act"' in await r.text()) is nav
            async with http.post(base + "/ui/act", data={"csrf": csrf}, headers={"Origin": base}) as r:
                assert r.status == status, (user, await r.text())
    async with (
        console_client() as http,
        http.post(base + "/ui/act", data={"csrf": "x"}, headers={"Origin": base}) as r,
    ):  # not signed in at all; fmt: skip
        assert r.status == 403


async def test_a_get_of_login_start_signs_nobody_out(plane: ControlPlane, idp: LocalIdP) -> None:
    """/ui/login/start is a GET any page can trigger (a link, an <img>, a redirect). Before, it ended the session
    it came with and cleared the session cookie: a same-site page signed users out, a cross-site navigation
    cleared their cookie. Now a signed-in browser is sent to the console and no session cookie is touched."""
    base = f"http://127.0.0.1:{plane.admin_port}"
    async with console_client() as http:
        await http_login(http, base, idp, "ada", idp.users["ada"].password)
        async with http.get(base + "/ui/login/start", allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (302, "/ui/")
            assert not any(c.startswith(SESSION_COOKIE + "=") for c in r.headers.getall("Set-Cookie", []))
        async with http.get(base + "/ui/", allow_redirects=False) as r:
            assert r.status == 200  # still signed in
    async with (
        console_client() as http,  # no session: to the IdP, and still no session cookie cleared
        http.get(base + "/ui/login/start", allow_redirects=False) as r,
    ):
        assert r.status == 302 and r.headers["Location"].startswith(idp.issuer + "/authorize?")
        assert not any(c.startswith(SESSION_COOKIE + "=") for c in r.headers.getall("Set-Cookie", []))


async def test_what_agents_report_is_escaped_on_the_fleet_page(plane: ControlPlane, idp: LocalIdP) -> None:
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    plane.publisher.agents["orders/x"] = AgentInfo(hostile, "orders", "ipv4:127.0.0.1:1", version=hostile,
                                                   error=hostile)  # fmt: skip
    base = f"http://127.0.0.1:{plane.admin_port}"
    async with console_client() as http:
        await http_login(http, base, idp, "vic", idp.users["vic"].password)
        async with http.get(base + "/ui/") as r:
            page = await r.text()
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page


def test_a_missing_console_extra_is_said_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setattr(cli, "missing_modules", lambda modules: ["jinja2"])
    code = cli.main(["control-plane", "--policies", str(tmp_path), "--signing-key", "k.pem", "--insecure",
                     "--console-issuer", "http://127.0.0.1:9", "--console-client-id", "c"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "needs the console extra" in err and len(err.strip().splitlines()) == 1
