"""Fidelity of `policy test` (issue 13: "a passing test means the same answer in production"), against real Envoy.

Every case of a test file is decided twice by the same engine and the same throwaway keys: once as `policy test`
builds the request, and once as real Envoy (the bootstrap `envoy-config --policy` writes) delivers the same client
request to the agent's gRPC transport. Each case must get the same answer both ways, the headers the agent sees must
be the ones `policy test` models (Envoy's pseudo-headers, X-Forwarded-For/-Proto, X-Request-Id,
X-Envoy-External-Address), and an allowed case's `upstream_headers` must be what the app behind Envoy receives.
(Found by a hostile review: before, rules reading headers, signatures and upstream expectations differed.)
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import os
import socket
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.config import load_policy, load_policy_text
from agent.decision import Decision, RequestView
from agent.demo.app import start_site
from agent.engine import Engine
from agent.envoyconf import REMOVED_BEFORE_AUTHZ, EnvoyProcess, bootstrap, needs
from agent.policytest import run_file_async
from agent.policytest.cases import read_test_file
from agent.policytest.runner import ClientRequest, Run
from agent.server.grpc_transport import GrpcTransport

pytestmark = pytest.mark.e2e

POLICY = textwrap.dedent("""\
    version: 1
    service: orders
    identity_providers:
      corp:
        issuer: https://idp.example.com
        jwks_uri: https://idp.example.com/.well-known/jwks.json
        audiences: [orders-api]
        algorithms: [ES256]
    hmac_clients:
      billing-batch:
        key_file: billing.key
        roles: [billing]
    deny:
      # "the internet ingress sets x-forwarded-for; /internal is for callers inside the mesh"
      - name: no-proxied-internal
        when: 'request.path.startsWith("/internal") && "x-forwarded-for" in request.headers'
    routes:
      - name: internal
        match: {path: "/internal/**"}
        public: true
      - name: tls-only
        match: {methods: [GET], path: /v1/secure}
        authn: [jwt]
        allow: {when: 'request.scheme == "https"'}
      - name: create-order
        match: {methods: [POST], path: /v1/orders}
        authn: [jwt]
        bind: dpop
        allow: {}
      - name: list-orders
        match: {methods: [GET], path: /v1/orders}
        authn: [jwt]
        allow: {}
      - name: search
        match: {methods: [GET], path: /v1/search}
        authn: [jwt]
        allow: {when: '"q" in request.query'}
      - name: billing
        match: {methods: [POST], path: "/v1/billing/**"}
        authn: [hmac]
        allow: {roles_any: [billing]}
    default: deny
    """)

CASES = textwrap.dedent("""\
    policy: orders.yaml
    cases:
      - name: internal, seen through Envoy (which adds x-forwarded-for)
        request: {method: GET, path: /internal/metrics, scheme: http, source: 127.0.0.1}
        expect: {status: 403, reason: denied_by_rule}
      - name: tls-only on a plaintext listener
        request: {method: GET, path: /v1/secure, scheme: http, source: 127.0.0.1}
        token: {claims: {sub: alice}}
        expect: {status: 403, reason: condition_failed}
      - name: a key-bound token with a fresh proof
        request: {method: POST, path: /v1/orders, scheme: http, source: 127.0.0.1}
        token: {claims: {sub: carol}, dpop: true}
        expect: {status: 200}
      - name: a short search
        request: {method: GET, path: "/v1/search?q=shoes", scheme: http, source: 127.0.0.1}
        token: {claims: {sub: alice}}
        expect: {status: 200}
      - name: a long search (the path counts twice against what a `when` may read)
        request: {method: GET, path: "/v1/search?q=QUERY", scheme: http, source: 127.0.0.1}
        token: {claims: {sub: alice}}
        expect: {status: 403}
      - name: what the app receives
        request:
          method: GET
          path: /v1/orders
          scheme: http
          source: 127.0.0.1
          headers: {x-forwarded-host: partner.example.com, x-tenant: acme, x-http-method-override: DELETE}
        token: {claims: {sub: alice}}
        expect:
          status: 200
          upstream_headers:
            x-authz-subject: alice
            x-tenant: acme
            x-forwarded-for: 127.0.0.1
            x-forwarded-proto: http
            x-forwarded-host: null
            x-http-method-override: null
            authorization: null
      - name: signed webhook
        request: {method: POST, path: /v1/billing/runs, body: '{"period": "2026-11"}', scheme: http, source: 127.0.0.1}
        signed_by: billing-batch
        expect: {status: 200}
    """).replace("QUERY", "x" * 9000)
# What differs between two deliveries of the same request, by design: a fresh request id each time, and the
# address Envoy appends to X-Forwarded-For for a client on loopback (its own, not the client's).
VARIES = {"x-request-id", "x-forwarded-for"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send(port: int, request: ClientRequest) -> int:
    """The client's request, sent to Envoy over HTTP/1.1."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(request.method, request.path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("host", request.host)
        for name, value in request.headers.items():
            if name != "content-length":
                conn.putheader(name, value)
        if request.body:
            conn.putheader("content-length", str(len(request.body)))
        conn.endheaders(request.body or None)
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


async def test_a_passing_policy_test_means_the_same_answer_behind_envoy(tmp_path: Path) -> None:
    (tmp_path / "orders.yaml").write_text(POLICY)
    (tmp_path / "billing.key").write_text(base64.b64encode(os.urandom(32)).decode())
    (tmp_path / "orders.test.yaml").write_text(CASES)
    assert (await run_file_async(tmp_path / "orders.test.yaml")).ok  # every case passes in `policy test`

    tests = read_test_file(tmp_path / "orders.test.yaml")
    policy = load_policy(tests.policy_path)
    run = Run(policy)
    delivered: list[RequestView] = []
    upstream: list[dict[str, str]] = []
    current: dict[str, Engine] = {}

    class Recording:
        def decide(self, view: RequestView) -> Any:
            delivered.append(view)
            return current["engine"].decide(view)

    async def app_handler(request: web.Request) -> web.Response:
        upstream.append({k.lower(): v for k, v in request.headers.items()})
        return web.Response(text="ok")

    transport = GrpcTransport(lambda: Recording(), f"127.0.0.1:{free_port()}")  # type: ignore[arg-type,return-value]
    await transport.start()
    await transport.set_serving(True)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", app_handler)
    runner, app_port = await start_site(app)
    port = free_port()
    request_body, _ = needs(policy)
    config = bootstrap(f"127.0.0.1:{port}", f"127.0.0.1:{app_port}", f"127.0.0.1:{transport.port}",
                       request_body=request_body)  # fmt: skip
    envoy = EnvoyProcess(config, tmp_path / "envoy")
    await asyncio.to_thread(envoy.start)
    differ = []
    try:
        for case in tests.cases:
            now = time.time()
            built = Engine(policy, run.stores())
            minted = run.mint(case.token, now, {}) if case.token is not None else None
            client = run.client_request(case, built, now, minted)
            modelled = client.delivered(run.bodies)
            tested: Decision = await built.check(modelled, [])
            current["engine"] = Engine(policy, run.stores())
            seen = len(delivered)
            status = await asyncio.to_thread(send, port, client)
            if len(delivered) == seen:
                differ.append(f"{case.name}: Envoy answered {status} itself; the agent never saw the request")
                continue
            real = delivered[-1]
            if status != tested.status:
                differ.append(f"{case.name}: policy test {tested.status} {tested.reason}, behind Envoy {status}")
            ours = {k: v for k, v in modelled.headers.items() if k not in VARIES}
            theirs = {k: v for k, v in real.headers.items() if k not in VARIES}
            if ours != theirs or modelled.headers.keys() != real.headers.keys():
                values = sorted(k for k in ours if ours.get(k) != theirs.get(k))
                differ.append(f"{case.name}: headers modelled {sorted(modelled.headers)}, delivered "
                              f"{sorted(real.headers)}; values differ: {values}")  # fmt: skip
            if (modelled.body, modelled.scheme, modelled.host) != (real.body, real.scheme, real.host):
                differ.append(f"{case.name}: body/scheme/host modelled differently from what Envoy delivered")
            if tested.allowed and case.expect.upstream_headers and upstream:
                got = upstream[-1]
                for name, want in case.expect.upstream_headers.items():
                    if got.get(name) != want:
                        differ.append(
                            f"{case.name}: upstream {name} {want!r} in policy test, {got.get(name)!r} behind Envoy"
                        )
    finally:
        envoy.stop()
        await runner.cleanup()
        await transport.stop(0)
    assert differ == [], "\n".join(differ)


async def test_the_headers_a_case_may_not_send_are_the_ones_envoy_removes(tmp_path: Path) -> None:
    """A case sending a header of REMOVED_BEFORE_AUTHZ (or `te` other than trailers) is an error in `policy test`:
    real Envoy, as envoy-config sets it up, takes each out of a client's request before the agent sees it, so a
    rule reading it would pass a test and never hold in production."""
    policy = load_policy_text("version: 1\nservice: orders\nroutes:\n- {name: all, match: {path: /x}, public: true}\n")
    delivered: list[RequestView] = []

    class Recording:
        def decide(self, view: RequestView) -> Any:
            delivered.append(view)
            return Engine(policy, {}).decide(view)

    transport = GrpcTransport(lambda: Recording(), f"127.0.0.1:{free_port()}")  # type: ignore[arg-type,return-value]
    await transport.start()
    await transport.set_serving(True)

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner, app_port = await start_site(app)
    port = free_port()
    config = bootstrap(f"127.0.0.1:{port}", f"127.0.0.1:{app_port}", f"127.0.0.1:{transport.port}", request_body=True)
    envoy = EnvoyProcess(config, tmp_path / "envoy")
    await asyncio.to_thread(envoy.start)
    seen: dict[str, str | None] = {}
    try:
        sent = {name: "100-continue" if name == "expect" else "1" for name in REMOVED_BEFORE_AUTHZ} | {"te": "gzip"}
        for name, value in sorted(sent.items()):
            n = len(delivered)
            request = ClientRequest("GET", "/x", "orders", "http", "127.0.0.1", {name: value}, b"", "")
            status = await asyncio.to_thread(send, port, request)
            assert status == 200 and len(delivered) == n + 1, f"{name}: Envoy answered {status} itself"
            seen[name] = delivered[-1].headers.get(name)
    finally:
        envoy.stop()
        await runner.cleanup()
        await transport.stop(0)
    assert {name: value for name, value in seen.items() if value is not None} == {}
