"""Hostile requests through the product's own Envoy config to a WSGI app, read as Python apps read them (issue 11).

The upstream is the standard library's wsgiref: what it records (REQUEST_METHOD, HTTP_* names with `-` as `_`) is
what Django, Flask and most Python apps see. Each test is a way past the rules that worked before, on both
transports: the generated config as a client-facing edge, and the agent behind it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from agent import reasons as R
from agent.demo.idp import LocalIdP
from agent.envoyconf import EnvoyProcess, bootstrap
from tests.e2e.conftest import AgentProcess, LoopThread, Response, free_port, idp_yaml, request
from tests.wait import until

POLICY = """version: 1
service: orders
{idp}    introspection_endpoint: {issuer}/introspect
    client_id: {client_id}
    client_secret_file: {secret_file}
    introspection_cache_s: 0
routes:
  - name: public
    match: {{path: "/v1/public/**"}}
    public: true
  - name: list-orders
    match: {{methods: [GET, POST], path: /v1/orders}}
    authn: [jwt]
    allow: {{}}
  - name: delete-order
    match: {{methods: [DELETE], path: "/v1/orders/{{id}}"}}
    authn: [jwt]
    allow: {{roles_any: [admin]}}
  - name: order
    match: {{path: "/v1/orders/{{id}}"}}
    authn: [jwt]
    allow: {{scopes_all: [orders:read]}}
  - name: admin
    match: {{path: /admin/**}}
    authn: [jwt]
    allow: {{roles_any: [admin]}}
default: deny
"""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class EchoApp:
    """A WSGI app on the standard library's server: it answers with what it read, as Django and Flask read it."""

    seen: list[dict[str, str]] = field(default_factory=list)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        keep = {k: v for k, v in environ.items() if k.startswith("HTTP_") or k in ("REQUEST_METHOD", "PATH_INFO")}
        keep["REMOTE_ADDR"] = environ.get("REMOTE_ADDR", "")
        self.seen.append(keep)
        body = json.dumps(keep).encode()
        start_response("200 OK", [("content-type", "application/json"), ("content-length", str(len(body)))])
        return [body]


@dataclass
class Edge:
    port: int
    app: EchoApp
    idp: LocalIdP
    envoy: EnvoyProcess
    agent: AgentProcess
    upstream: str
    work: Path

    def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        return request(self.port, "GET", path, headers)


@pytest.fixture(scope="module")
def edge(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[Edge]:
    work = tmp_path_factory.mktemp("edge")
    app = EchoApp()
    server = make_server("127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    idp = LocalIdP()
    loop_thread.run(idp.start())
    secret = work / "introspection.secret"
    secret.write_text(idp.client_secret)
    policy: Path = work / "policy.yaml"
    policy.write_text(
        POLICY.format(idp=idp_yaml(idp.issuer), issuer=idp.issuer, client_id=idp.client_id, secret_file=secret)
    )
    listen = f"127.0.0.1:{free_port()}"
    agent = AgentProcess(policy, listen, work, transport)
    port = free_port()
    # Exactly what `authz-agent envoy-config` writes by default: the configuration users deploy.
    envoy = EnvoyProcess(bootstrap(f"127.0.0.1:{port}", f"127.0.0.1:{server.server_port}", listen), work)
    try:
        envoy.start()
        yield Edge(port, app, idp, envoy, agent, f"127.0.0.1:{server.server_port}", work)
    finally:
        envoy.stop()
        agent.stop()
        server.shutdown()
        server.server_close()
        loop_thread.run(idp.stop())


@dataclass
class H2Answer:
    status: int | None  # None: no response headers, the stream was reset
    reset: int | None  # the RST_STREAM error code, when reset
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def h2_request(port: int, headers: list[tuple[str, str]], timeout: float = 10.0) -> tuple[H2Answer, dict[Any, int]]:
    """One request over cleartext HTTP/2 (prior knowledge), and the SETTINGS Envoy advertised."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    answer = H2Answer(None, None, {}, b"")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + timeout
        done = False
        while not done and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    answer.headers = {str(k): str(v) for k, v in ev.headers}
                    answer.status = int(answer.headers[":status"])
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    answer.body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    done = True
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    answer.reset, done = int(ev.error_code), True
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    done = True
            sock.sendall(conn.data_to_send())
        assert done, "no answer from Envoy in time"
        return answer, dict(conn.remote_settings)


def _h2_get(port: int, path: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [(":method", "GET"), (":scheme", "http"), (":authority", f"127.0.0.1:{port}"), (":path", path), *extra]


# Item 2 of issue 11: WSGI reads `x_authz_subject` as HTTP_X_AUTHZ_SUBJECT, the agent's own header.
UNDERSCORED = {"x_authz_subject": "mallory", "x-authz_client_id": "evil"}


def test_underscore_headers_are_refused_by_envoy_over_http1(edge: Edge) -> None:
    before = len(edge.app.seen)
    for name, value in UNDERSCORED.items():
        r = edge.get("/v1/public/profile", {name: value})
        assert r.status == 400, (name, r.status, r.body)
    token = edge.idp.mint(sub="alice")
    r = edge.get("/v1/orders", {"authorization": f"Bearer {token}", "x_authz_subject": "mallory"})
    assert r.status == 400  # authenticated route: never "mallory,alice" at the app
    assert len(edge.app.seen) == before  # none reached the app
    assert edge.get("/v1/public/profile").status == 200


def test_underscore_headers_are_refused_by_envoy_over_http2(edge: Edge) -> None:
    before = len(edge.app.seen)
    for name, value in UNDERSCORED.items():
        answer, _ = h2_request(edge.port, _h2_get(edge.port, "/v1/public/profile", (name, value)))
        # Over HTTP/2 Envoy resets the stream (RST_STREAM; HTTP/1.1 gets a 400): no response, no request.
        assert answer.status is None and answer.reset is not None, answer
    assert len(edge.app.seen) == before
    answer, _ = h2_request(edge.port, _h2_get(edge.port, "/v1/public/profile"))
    assert answer.status == 200


def test_the_app_sees_the_real_peer_not_the_clients_forwarded_for(edge: Edge) -> None:
    r = edge.get("/v1/public/who", {"x-forwarded-for": "1.2.3.4", "x-forwarded-proto": "https"})
    assert r.status == 200
    seen = r.json()
    assert seen["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"  # the peer only: the claim is neither first nor kept
    assert seen["HTTP_X_FORWARDED_PROTO"] == "http"  # the listener's own scheme, not the client's claim
    answer, _ = h2_request(edge.port, _h2_get(edge.port, "/v1/public/who", ("x-forwarded-for", "1.2.3.4, 10.0.0.1")))
    assert answer.status == 200 and answer.json()["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"


ENVOY_INTERNAL = {
    "x-envoy-original-path": "/admin",
    "x-envoy-internal": "true",
    "x-envoy-retry-on": "5xx",
    "x-envoy-max-retries": "10",
    "x-envoy-upstream-rq-timeout-ms": "1",
    "x-envoy-downstream-service-cluster": "admin",
    "x-envoy-ip-tags": "internal",
    "x-envoy-external-address": "10.0.0.1",
}


def test_x_envoy_headers_from_a_client_never_reach_the_app(edge: Edge) -> None:
    r = edge.get("/v1/public/x", {**ENVOY_INTERNAL, "x-request-id": "chosen-by-the-client"})
    assert r.status == 200  # the upstream timeout of 1 ms was not taken from the client either
    seen = r.json()
    reached = {k for k in seen if k.startswith("HTTP_X_ENVOY_")}
    assert reached <= {"HTTP_X_ENVOY_EXPECTED_RQ_TIMEOUT_MS", "HTTP_X_ENVOY_EXTERNAL_ADDRESS"}, reached
    assert seen.get("HTTP_X_ENVOY_EXTERNAL_ADDRESS", "127.0.0.1") == "127.0.0.1"  # Envoy's, from the peer
    assert seen["HTTP_X_REQUEST_ID"] != "chosen-by-the-client"  # an external request gets Envoy's own id


def test_method_override_headers_are_removed_before_the_app(edge: Edge) -> None:
    overrides = {"x-http-method-override": "DELETE", "x-http-method": "DELETE", "x-method-override": "DELETE"}
    paths = {"x-original-url": "/admin/keys", "x-rewrite-url": "/admin/keys"}
    r = edge.get("/v1/public/x", {**overrides, **paths})
    assert r.status == 200
    seen = r.json()
    assert seen["REQUEST_METHOD"] == "GET"
    assert not {"HTTP_X_HTTP_METHOD_OVERRIDE", "HTTP_X_HTTP_METHOD", "HTTP_X_METHOD_OVERRIDE"} & set(seen)
    assert not {"HTTP_X_ORIGINAL_URL", "HTTP_X_REWRITE_URL"} & set(seen)


def test_what_a_client_claims_about_its_route_never_reaches_the_app(edge: Edge) -> None:
    claims = {
        "forwarded": "for=1.2.3.4;host=admin.example;proto=https",
        "x-forwarded-host": "admin.example",
        "x-forwarded-port": "443",
        "x-forwarded-prefix": "/admin",
        "x-real-ip": "1.2.3.4",
    }
    seen = edge.get("/v1/public/x", claims).json()
    assert not [k for k in seen if k in {"HTTP_" + c.upper().replace("-", "_") for c in claims}], seen


def test_http2_limits_follow_envoys_edge_guidance(edge: Edge) -> None:
    answer, settings = h2_request(edge.port, _h2_get(edge.port, "/v1/public/x"))
    assert answer.status == 200
    assert settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 100
    assert settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] == 65536


def test_a_slow_introspection_endpoint_within_common_latency_still_answers(edge: Edge) -> None:
    # A stock django-oauth-toolkit checks a PBKDF2 client secret per call: 0.35-0.64 s measured.
    token = edge.idp.mint_opaque(sub="alice")
    edge.idp.mode, edge.idp.slow_s = "slow", 0.7
    try:
        r = edge.get("/v1/orders", {"authorization": f"Bearer {token}"})
    finally:
        edge.idp.mode = "ok"
    assert r.status == 200, r.body
    assert r.json()["HTTP_X_AUTHZ_SUBJECT"] == "alice"


def test_behind_a_trusted_proxy_the_app_sees_the_address_it_recorded(edge: Edge) -> None:
    # `envoy-config --trusted-hops 1`: one load balancer in front appends the client it saw to X-Forwarded-For.
    port = free_port()
    envoy = EnvoyProcess(
        bootstrap(f"127.0.0.1:{port}", edge.upstream, edge.agent.listen, trusted_hops=1), edge.work / "hops"
    )
    envoy.start()
    try:
        r = request(port, "GET", "/v1/public/lb", {"x-forwarded-for": "1.2.3.4, 198.51.100.7"})
    finally:
        envoy.stop()
    assert r.status == 200
    assert r.json()["HTTP_X_FORWARDED_FOR"] == "198.51.100.7"  # the rightmost, what the trusted hop saw

    def sources() -> list[str]:
        text = edge.agent.audit.read_text() if edge.agent.audit.exists() else ""
        records = [json.loads(x) for x in text.splitlines() if x.strip()]
        return [rec["source"] for rec in records if rec.get("path") == "/v1/public/lb"]

    until(sources, "the request is audited")
    # ext_authz names the connection's peer as the source (envoy/README.md: source_cidrs behind a load balancer).
    assert sources() == ["127.0.0.1"]


def reason(body: bytes) -> str | None:
    try:
        return str(json.loads(body).get("reason"))
    except ValueError:
        return None


def test_a_lower_case_http2_method_is_never_judged_as_another_method(edge: Edge) -> None:
    token = edge.idp.mint(scope="orders:read")

    def call(method: str) -> H2Answer:
        base = [(":method", method), (":scheme", "http"), (":authority", f"127.0.0.1:{edge.port}")]
        return h2_request(edge.port, [*base, (":path", "/v1/orders/7"), ("authorization", f"Bearer {token}")])[0]

    assert call("GET").status == 200  # the reader may read, any method but DELETE
    answer = call("DELETE")
    assert (answer.status, reason(answer.body)) == (403, R.ROLE_MISSING)
    for method in ("delete", "Delete", "dElEtE"):
        answer = call(method)
        # Envoy forwards `delete` over HTTP/2; Django and Werkzeug would upper-case it and run DELETE.
        assert (answer.status, reason(answer.body)) == (400, R.METHOD_INVALID), (method, answer)
    assert [r for r in edge.app.seen if r["REQUEST_METHOD"].upper() == "DELETE"] == []


def test_forged_identity_headers_in_any_case_never_reach_the_app_as_the_agents(edge: Edge) -> None:
    token = edge.idp.mint(scope="orders:read")
    for path, auth in (("/v1/public/a", {}), ("/v1/orders/7", {"authorization": f"Bearer {token}"})):
        r = edge.get(path, {"X-Authz-Subject": "mallory", "X-AUTHZ-ROUTE": "admin", **auth})
        assert r.status == 200
        seen = r.json()
        assert "mallory" not in json.dumps(seen) and seen.get("HTTP_X_AUTHZ_ROUTE") != "admin", seen
    assert r.json()["HTTP_X_AUTHZ_SUBJECT"] == "alice"  # the agent's own, overwriting the client's


def test_method_override_headers_never_reach_the_app_on_authenticated_routes(edge: Edge) -> None:
    token = edge.idp.mint(scope="orders:read")
    for name in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"):
        r = edge.get("/v1/orders/7", {"authorization": f"Bearer {token}", name: "DELETE"})
        assert r.status == 200, r.body
        seen = r.json()
        assert seen["REQUEST_METHOD"] == "GET"
        assert not [k for k in seen if k.startswith("HTTP_") and "METHOD" in k], seen


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/v1/public/%252e%252e/admin/keys", R.PATH_DOUBLE_ENCODED),
        ("/v1/public/..;/admin/keys", R.MALFORMED_REQUEST),
        ("/v1/public/.%2e;x/admin/keys", R.MALFORMED_REQUEST),
    ],
)
def test_paths_an_upstream_reads_otherwise_are_refused(edge: Edge, path: str, why: str) -> None:
    before = len(edge.app.seen)
    r = edge.get(path)
    # Envoy's own normalisation settles some first (it reads `..;` as `..`, then no route): never the app.
    assert (r.status, reason(r.body)) in ((400, why), (403, R.NO_ROUTE)), (r.status, r.body)
    assert len(edge.app.seen) == before


def test_a_subject_with_surrounding_spaces_is_refused(edge: Edge) -> None:
    """Envoy trims header values: " alice " would reach the app as alice, another identity."""
    token = edge.idp.mint(sub=" alice ", scope="orders:read")
    r = edge.get("/v1/orders/7", {"authorization": f"Bearer {token}"})
    assert (r.status, reason(r.body)) == (401, R.TOKEN_CLAIM_INVALID)
