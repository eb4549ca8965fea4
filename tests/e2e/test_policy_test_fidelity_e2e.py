"""Fidelity of `policy test` (issue 13: "a passing test means the same answer in production"), against real Envoy.

Every case of a test file is decided twice by the same engine and the same throwaway keys: once as `policy test`
builds the request, and once as real Envoy (the bootstrap `envoy-config --policy` writes) delivers the same HTTP
request to the agent's gRPC transport. Each case that passes in `policy test` must get the same status behind Envoy,
and an allowed case's `upstream_headers` must be what the app behind Envoy really receives. On lead13 most differ:
Envoy adds x-forwarded-for / x-forwarded-proto / x-request-id and the pseudo-headers before ext_authz, passes
scheme http on the listener it generates (the runner defaults to https, which DPoP's htu then uses), refuses
header names with underscores, counts `:path` against the 16 KiB a `when` may read, and rewrites what the app gets.
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

from agent.config import load_policy
from agent.decision import Decision, RequestView
from agent.demo.app import start_site
from agent.engine import Engine
from agent.envoyconf import EnvoyProcess, bootstrap, needs
from agent.policytest import run_file_async
from agent.policytest.cases import read_test_file
from agent.policytest.runner import _Run
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
      - name: internal from the mesh
        request: {method: GET, path: /internal/metrics}
        expect: {status: 200, route: internal}
      - name: tls-only with a token
        request: {method: GET, path: /v1/secure}
        token: {claims: {sub: alice}}
        expect: {status: 200}
      - name: a key-bound token with a fresh proof
        request: {method: POST, path: /v1/orders}
        token: {claims: {sub: carol}, dpop: true}
        expect: {status: 200}
      - name: a header with an underscore
        request: {method: GET, path: /v1/orders, headers: {x_tenant: acme}}
        token: {claims: {sub: alice}}
        expect: {status: 200}
      - name: a long search
        request: {method: GET, path: "/v1/search?q=QUERY"}
        token: {claims: {sub: alice}}
        expect: {status: 200}
      - name: what the app receives
        request: {method: GET, path: /v1/orders, headers: {x-forwarded-host: partner.example.com}}
        token: {claims: {sub: alice}}
        expect: {status: 200, upstream_headers: {x-forwarded-host: partner.example.com, x-forwarded-for: null}}
      - name: signed webhook
        request: {method: POST, path: /v1/billing/runs, body: '{"period": "2026-11"}'}
        signed_by: billing-batch
        expect: {status: 200}
    """).replace("QUERY", "x" * 9000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send(port: int, view: RequestView) -> int:
    """The request a client makes so that Envoy passes the agent what `policy test` built."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(view.method, view.path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("host", view.host)
        for name, value in view.headers.items():
            if name != "content-length":
                conn.putheader(name, value)
        if view.body:
            conn.putheader("content-length", str(len(view.body)))
        conn.endheaders(view.body or None)
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
    run = _Run(policy)
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
            built = Engine(policy, run._stores())
            minted = run._mint(case.token, time.time(), {}) if case.token is not None else None
            view = run._request(case, built, time.time(), minted)
            tested: Decision = await built.check(view, [])
            current["engine"] = Engine(policy, run._stores())
            seen = len(delivered)
            status = await asyncio.to_thread(send, port, view)
            where = "the agent" if len(delivered) > seen else "Envoy itself (the agent never saw it)"
            if status != tested.status:
                differ.append(
                    f"{case.name}: policy test {tested.status} {tested.reason}, behind Envoy {status} from {where}"
                )
            elif tested.allowed and case.expect.upstream_headers and upstream:
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
