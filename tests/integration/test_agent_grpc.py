"""The agent over real gRPC with a real HTTP identity provider: discovery, rotation, outages, TLS, introspection."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent import reasons as R
from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
from agent._xds.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from agent.config import load_policy
from agent.demo.idp import LocalIdP
from agent.server.run import AgentServer
from tests.wait import until_async


def policy_text(idp: LocalIdP, source: str, extra: str = "", refetch: int = 60) -> str:
    return f"""version: 1
service: orders
identity_providers:
  corp:
    issuer: {idp.issuer}
    {source}
    audiences: [orders-api]
    algorithms: [ES256]
    min_refetch_s: {refetch}
    unknown_kid_wait_s: 0.5
    fetch_timeout_s: 1
    refresh_s: 300
{extra}
routes:
  - name: list-orders
    match: {{methods: [GET], path: /v1/orders}}
    authn: [jwt]
    allow: {{scopes_all: [orders:read]}}
"""


class Harness:
    def __init__(self, idp: LocalIdP, server: AgentServer, admin: str) -> None:
        self.idp, self.server, self.admin = idp, server, admin
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = ext_grpc.AuthorizationStub(self.channel)

    async def check(self, token: str | None = None, path: str = "/v1/orders") -> Any:
        req = ext.CheckRequest()
        http = req.attributes.request.http
        http.method, http.path, http.host = "GET", path, "orders.local"
        if token is not None:
            http.headers["authorization"] = f"Bearer {token}"
        req.attributes.source.address.socket_address.address = "127.0.0.9"
        return await self.stub.Check(req, timeout=5)


def reason(resp: Any) -> str:
    return str(resp.dynamic_metadata["reason"])


@pytest.fixture
async def make_harness(tmp_path: Path, unused_tcp_port_factory: Any) -> AsyncIterator[Any]:
    made: list[Harness] = []

    async def make(idp: LocalIdP, source: str, extra: str = "", wait_ready: bool = True, refetch: int = 60) -> Harness:
        p = tmp_path / "policy.yaml"
        p.write_text(policy_text(idp, source, extra, refetch))
        admin = f"127.0.0.1:{unused_tcp_port_factory()}"
        server = AgentServer(load_policy(p), "127.0.0.1:0", admin, str(tmp_path / "audit.log"))
        await server.start()
        if wait_ready:
            assert await server.wait_ready(5)
        h = Harness(idp, server, admin)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.channel.close()
        await h.server.stop(0.1)


@pytest.fixture
async def idp() -> AsyncIterator[LocalIdP]:
    i = LocalIdP()
    await i.start()
    yield i
    await i.stop()


async def test_discovery_then_check_over_grpc(idp: LocalIdP, make_harness: Any) -> None:
    h = await make_harness(idp, "discovery: true")
    ok = await h.check(idp.mint())
    assert ok.status.code == 0 and reason(ok) == R.ALLOWED
    headers = {o.header.key: o.header.value for o in ok.ok_response.headers}
    assert headers["x-authz-subject"] == "alice" and headers["x-authz-route"] == "list-orders"
    denied = await h.check(None)
    assert denied.denied_response.status.code == 401 and denied.status.code == 16
    problem = json.loads(denied.denied_response.body)
    assert problem["reason"] == R.TOKEN_MISSING and problem["decision_id"] == denied.dynamic_metadata["decision_id"]
    assert idp.discovery_hits == 1 and idp.jwks_hits == 1


async def test_health_service_and_readyz_follow_key_loading(idp: LocalIdP, make_harness: Any) -> None:
    idp.mode = "down"
    h = await make_harness(idp, f"jwks_uri: {idp.jwks_uri}", wait_ready=False)
    health = health_pb2_grpc.HealthStub(h.channel)
    name = "envoy.service.auth.v3.Authorization"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{h.admin}/readyz") as r:
            assert r.status == 503
            assert (await r.json())["identity_providers"]["corp"]["error"].startswith("KeySourceError")
        resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # Not ready means fail closed, with an error reason told apart from a deny.
        early = await h.check(idp.mint())
        assert reason(early) == R.KEYS_UNAVAILABLE and early.denied_response.status.code == 503
        assert early.dynamic_metadata["decision"] == "error"
        idp.mode = "ok"
        assert await h.server.wait_ready(5)

        async def serving() -> bool:
            resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

        await until_async(serving, "the readiness watcher flips health to SERVING")
        async with http.get(f"http://{h.admin}/readyz") as r:
            assert r.status == 200
        async with http.get(f"http://{h.admin}/healthz") as r:
            assert r.status == 200


async def test_key_rotation_is_picked_up_by_one_refetch(idp: LocalIdP, make_harness: Any) -> None:
    h = await make_harness(idp, f"jwks_uri: {idp.jwks_uri}", refetch=0)
    old = idp.mint()
    hits = idp.jwks_hits
    new_key = idp.rotate(keep_old=False)
    fresh = idp.mint(key=new_key)
    assert reason(await h.check(fresh)) == R.ALLOWED
    assert idp.jwks_hits == hits + 1
    # The old key is gone from the published set now: its tokens fail.
    assert reason(await h.check(old)) in (R.TOKEN_KID_UNKNOWN,)


async def test_a_storm_of_unknown_kids_is_one_fetch(idp: LocalIdP, make_harness: Any) -> None:
    h = await make_harness(idp, f"jwks_uri: {idp.jwks_uri}")
    hits = idp.jwks_hits
    tokens = [idp.mint(header={"kid": f"ghost-{i}"}) for i in range(200)]
    results = await asyncio.gather(*(h.check(t) for t in tokens))
    assert {reason(r) for r in results} == {R.TOKEN_KID_UNKNOWN}
    assert idp.jwks_hits - hits == 1
    # Within min_refetch_s, more unknown kids cause no fetch at all.
    await asyncio.gather(*(h.check(t) for t in tokens[:50]))
    assert idp.jwks_hits - hits == 1


@pytest.mark.parametrize("mode", ["down", "garbage", "empty"])
async def test_last_good_keys_survive_a_broken_idp(idp: LocalIdP, make_harness: Any, mode: str) -> None:
    h = await make_harness(idp, f"jwks_uri: {idp.jwks_uri}", refetch=0)
    token = idp.mint()
    idp.mode = mode
    store = h.server.engine.stores["corp"]
    assert not await store.refresh()
    assert store.last_error is not None
    assert reason(await h.check(token)) == R.ALLOWED
    # An unknown kid while the IdP is broken is refused, and the good keys stay.
    assert reason(await h.check(idp.mint(header={"kid": "ghost"}))) == R.TOKEN_KID_UNKNOWN
    assert reason(await h.check(token)) == R.ALLOWED


async def test_a_hanging_idp_never_holds_a_request_beyond_the_bound(idp: LocalIdP, make_harness: Any) -> None:
    h = await make_harness(idp, f"jwks_uri: {idp.jwks_uri}", refetch=0)
    idp.mode = "slow"  # answers after 5 s
    start = time.monotonic()
    resp = await h.check(idp.mint(header={"kid": "ghost"}))
    assert reason(resp) == R.TOKEN_KID_UNKNOWN
    assert time.monotonic() - start < 3.0  # unknown_kid_wait_s is 0.5 s; the IdP would take 5 s


async def test_jwks_over_tls_with_a_configured_ca(tmp_path: Path, make_harness: Any) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tls_idp = LocalIdP(ssl_context=server_ctx)
    await tls_idp.start()
    try:
        h = await make_harness(tls_idp, f"discovery: true\n    ca_file: {ca_file}")
        assert reason(await h.check(tls_idp.mint())) == R.ALLOWED
    finally:
        await tls_idp.stop()


async def test_jwks_over_tls_with_an_untrusted_certificate_is_not_ready(tmp_path: Path, make_harness: Any) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    tls_idp = LocalIdP(ssl_context=server_ctx)
    await tls_idp.start()
    try:
        h = await make_harness(tls_idp, "discovery: true", wait_ready=False)
        await until_async(lambda: h.server.engine.stores["corp"].last_error, "the TLS failure is recorded")
        assert not h.server.engine.ready
        assert "SSL" in (h.server.engine.stores["corp"].last_error or "") or "certificate" in (
            h.server.engine.stores["corp"].last_error or ""
        )
    finally:
        await tls_idp.stop()


async def test_opaque_tokens_are_introspected_with_client_credentials(
    idp: LocalIdP, make_harness: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(idp.client_secret + "\n")
    extra = (
        f"    introspection_endpoint: {idp.issuer}/introspect\n    client_id: {idp.client_id}\n"
        f"    client_secret_file: {secret_file}\n    introspection_cache_s: 30\n"
    )
    h = await make_harness(idp, f"jwks_uri: {idp.jwks_uri}", extra=extra)
    token = idp.mint_opaque(sub="svc-1", scope="orders:read")
    first = await h.check(token)
    assert reason(first) == R.ALLOWED
    assert {o.header.key: o.header.value for o in first.ok_response.headers}["x-authz-subject"] == "svc-1"
    assert reason(await h.check(token)) == R.ALLOWED
    assert idp.introspection_hits == 1  # the second answer came from the cache
    dotted = idp.mint_opaque(prefix="ya29.", sub="svc-2", scope="orders:read")  # opaque tokens may hold a dot
    assert reason(await h.check(dotted)) == R.ALLOWED
    assert reason(await h.check(idp.mint_opaque(scope="profile"))) == R.SCOPE_MISSING
    assert reason(await h.check("never-issued-token")) == R.TOKEN_INACTIVE
    idp.mode = "down"
    down = await h.check(idp.mint_opaque())
    assert reason(down) == R.INTROSPECTION_UNAVAILABLE and down.denied_response.status.code == 503
    audit = tmp_path / "audit.log"
    await asyncio.sleep(0.2)
    text = caplog.text + audit.read_text()
    assert idp.client_secret not in text and token not in text


async def test_wrong_client_secret_fails_closed(idp: LocalIdP, make_harness: Any, tmp_path: Path) -> None:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("wrong\n")
    extra = (
        f"    introspection_endpoint: {idp.issuer}/introspect\n    client_id: {idp.client_id}\n"
        f"    client_secret_file: {secret_file}\n"
    )
    h = await make_harness(idp, f"jwks_uri: {idp.jwks_uri}", extra=extra)
    assert reason(await h.check(idp.mint_opaque())) == R.INTROSPECTION_UNAVAILABLE


async def test_jku_x5u_and_embedded_keys_are_never_fetched_or_trusted(idp: LocalIdP, make_harness: Any) -> None:
    h = await make_harness(idp, f"jwks_uri: {idp.jwks_uri}", refetch=0)
    attacker = LocalIdP()
    await attacker.start()
    try:
        evil_key = attacker.keys[0]
        header = {
            "jku": attacker.jwks_uri,
            "x5u": f"{attacker.issuer}/cert.pem",
            "jwk": evil_key.as_dict(private=False),
        }
        for kid in ("evil-kid", "key-1"):  # a kid nobody configured, then the IdP's own kid
            token = attacker.mint(header={**header, "kid": kid}, iss=idp.issuer)
            assert reason(await h.check(token)) in (R.TOKEN_KID_UNKNOWN, R.TOKEN_SIGNATURE_INVALID)
        assert attacker.jwks_hits == 0 and attacker.discovery_hits == 0
    finally:
        await attacker.stop()


async def introspecting(idp: LocalIdP, make_harness: Any, tmp_path: Path, more: str = "") -> Harness:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(idp.client_secret + "\n")
    extra = (
        f"    introspection_endpoint: {idp.issuer}/introspect\n    client_id: {idp.client_id}\n"
        f"    client_secret_file: {secret_file}\n{more}"
    )
    h: Harness = await make_harness(idp, f"jwks_uri: {idp.jwks_uri}", extra=extra)
    return h


def subject(resp: Any) -> str | None:
    return {o.header.key: o.header.value for o in resp.ok_response.headers}.get("x-authz-subject")


async def test_introspected_username_is_the_subject_not_the_client(
    idp: LocalIdP, make_harness: Any, tmp_path: Path
) -> None:
    # RFC 7662 §2.2: `sub`, else `username`, names the resource owner; only a token with neither is the client's.
    h = await introspecting(idp, make_harness, tmp_path)
    user = await h.check(idp.mint_opaque(sub=None, username="alice", client_id="shop-web"))
    assert reason(user) == R.ALLOWED and subject(user) == "alice"
    both = await h.check(idp.mint_opaque(sub="u-123", username="alice", client_id="shop-web"))
    assert reason(both) == R.ALLOWED and subject(both) == "u-123"
    client = await h.check(idp.mint_opaque(sub=None, client_id="shop-web"))
    assert reason(client) == R.ALLOWED and subject(client) == "shop-web"
    for bad in (" alice", "alice ", "al\x00ice", "alice\u00a0", 7):
        refused = await h.check(idp.mint_opaque(sub=None, username=bad, client_id="shop-web"))
        assert reason(refused) == R.TOKEN_CLAIM_INVALID, bad


async def test_introspected_null_username_is_absent_and_the_client_is_the_subject(
    idp: LocalIdP, make_harness: Any, tmp_path: Path
) -> None:
    # `"username": null` names no resource owner: the token is the client's own, as when it is absent.
    h = await introspecting(idp, make_harness, tmp_path)
    token = idp.mint_opaque(sub=None, client_id="shop-web")
    idp.opaque[token]["username"] = None
    client = await h.check(token)
    assert reason(client) == R.ALLOWED and subject(client) == "shop-web"
    nobody = idp.mint_opaque(sub=None, client_id=None)
    idp.opaque[nobody]["username"] = None
    assert reason(await h.check(nobody)) == R.TOKEN_CLAIM_MISSING
    # `"sub": null` is absent too: the user named by `username` is the subject.
    user = idp.mint_opaque(sub=None, client_id="shop-web", username="alice")
    idp.opaque[user]["sub"] = None
    assert subject(await h.check(user)) == "alice"


async def test_django_oauth_toolkit_shaped_answer_names_the_user(
    idp: LocalIdP, make_harness: Any, tmp_path: Path
) -> None:
    # What django-oauth-toolkit answers for a user's token: no sub, no aud, no iss, no iat.
    h = await introspecting(idp, make_harness, tmp_path, "    introspection_require_audience: false\n")
    token = idp.mint_opaque(sub=None, aud=None, iss=None, iat=None, jti=None, client_id="shop-web", username="alice")
    ok = await h.check(token)
    assert reason(ok) == R.ALLOWED and subject(ok) == "alice"


async def test_introspected_token_without_aud_is_refused_unless_opted_out(
    idp: LocalIdP, make_harness: Any, tmp_path: Path
) -> None:
    h = await introspecting(idp, make_harness, tmp_path)
    assert reason(await h.check(idp.mint_opaque(aud=None))) == R.TOKEN_CLAIM_MISSING
    assert reason(await h.check(idp.mint_opaque(aud="billing-api"))) == R.TOKEN_AUDIENCE_MISMATCH
    assert reason(await h.check(idp.mint_opaque(aud=["billing-api", 7]))) == R.TOKEN_CLAIM_INVALID
    assert reason(await h.check(idp.mint_opaque(aud=["billing-api", "orders-api"]))) == R.ALLOWED
    await h.server.stop(0.1)
    lax = await introspecting(idp, make_harness, tmp_path, "    introspection_require_audience: false\n")
    assert reason(await lax.check(idp.mint_opaque(aud=None))) == R.ALLOWED
    # The opt-out is for servers that never send aud: one that is sent must still name this API.
    assert reason(await lax.check(idp.mint_opaque(aud="billing-api"))) == R.TOKEN_AUDIENCE_MISMATCH


async def test_introspected_scopes_and_times_are_checked_like_a_jwts(
    idp: LocalIdP, make_harness: Any, tmp_path: Path
) -> None:
    h = await introspecting(idp, make_harness, tmp_path)
    assert reason(await h.check(idp.mint_opaque(scope="profile\u00a0orders:read"))) == R.TOKEN_CLAIM_INVALID
    assert reason(await h.check(idp.mint_opaque(scope="profile\torders:read"))) == R.TOKEN_CLAIM_INVALID
    assert reason(await h.check(idp.mint_opaque(scope=["profile", "orders:read"]))) == R.ALLOWED
    now = int(time.time())
    for field in ("exp", "nbf", "iat", "auth_time"):
        # (The local server answers inactive itself for an exp before now, so exp gets the huge values only.)
        values = (10**400, 1e300) if field == "exp" else (10**400, -(10**400), -1, True, 1e300)
        for value in values:
            token = idp.mint_opaque()
            idp.opaque[token][field] = value  # the server answers what it holds, as JSON
            resp = await h.check(token)
            assert resp.denied_response.status.code == 401, (field, value)
            assert reason(resp) == R.TOKEN_CLAIM_INVALID, (field, value)
    future = idp.mint_opaque(auth_time=now + 3600)
    assert reason(await h.check(future)) == R.TOKEN_CLAIM_INVALID
