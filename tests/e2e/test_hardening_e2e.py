"""Hostile requests through the product's own Envoy config to a WSGI app, read as Python apps read requests (issue 11).

The upstream is the standard library's wsgiref: what it records (REQUEST_METHOD, HTTP_* names with `-` as `_`) is
what Django, Flask and most Python apps see. Each test is a way past the rules that worked before, on both transports.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import h2.config
import h2.connection
import h2.events
import pytest

from agent import reasons as R
from agent.demo.idp import LocalIdP
from agent.envoyconf import EnvoyProcess, bootstrap
from tests.e2e.conftest import AgentProcess, LoopThread, Response, free_port, idp_yaml, request

POLICY = """version: 1
service: orders
{idp}routes:
  - name: delete-order
    match: {{methods: [DELETE], path: "/v1/orders/{{id}}"}}
    authn: [jwt]
    allow: {{roles_any: [admin]}}
  - name: order
    match: {{path: "/v1/orders/{{id}}"}}
    authn: [jwt]
    allow: {{scopes_all: [orders:read]}}
  - name: public
    match: {{path: /v1/public/**}}
    public: true
  - name: admin
    match: {{path: /admin/**}}
    authn: [jwt]
    allow: {{roles_any: [admin]}}
default: deny
"""


@dataclass
class WsgiApp:
    """A WSGI upstream that records, per request, the environ a Python app would read, and echoes it."""

    seen: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        view = {
            # Django, Werkzeug and WebOb upper-case the method they are given.
            "method": str(environ["REQUEST_METHOD"]).upper(),
            "path": str(environ.get("PATH_INFO", "")),
            **{k: str(v) for k, v in environ.items() if k.startswith("HTTP_")},
        }
        with self.lock:
            self.seen.append(view)
        body = json.dumps(view).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def requests(self) -> list[dict[str, str]]:
        with self.lock:
            return list(self.seen)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class HardStack:
    idp: LocalIdP
    app: WsgiApp
    port: int

    def reader(self) -> str:
        return self.idp.mint(scope="orders:read")

    def get(self, method: str, path: str, headers: dict[str, str] | None = None) -> Response:
        return request(self.port, method, path, headers)


@pytest.fixture(scope="module")
def hard(transport: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardStack]:
    work: Path = tmp_path_factory.mktemp("hard")
    lt = LoopThread()
    idp = LocalIdP()
    lt.run(idp.start())
    app = WsgiApp()
    server = make_server("127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    policy = work / "policy.yaml"
    policy.write_text(POLICY.format(idp=idp_yaml(idp.issuer)))
    agent = AgentProcess(policy, f"127.0.0.1:{free_port()}", work, transport)
    port = free_port()
    envoy = EnvoyProcess(bootstrap(f"127.0.0.1:{port}", f"127.0.0.1:{server.server_port}", agent.listen), work)
    envoy.start()
    try:
        yield HardStack(idp, app, port)
    finally:
        envoy.stop()
        agent.stop()
        server.shutdown()
        server.server_close()
        lt.run(idp.stop())
        lt.close()


def h2_request(port: int, headers: list[tuple[str, str]], timeout: float = 10.0) -> tuple[int, bytes]:
    """One HTTP/2 (prior knowledge) request, sent as written: the `h2` library does not fix the method's case."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        conn.initiate_connection()
        conn.send_headers(1, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        status, body = 0, b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return status, body
            sock.sendall(conn.data_to_send())
    raise TimeoutError("no complete HTTP/2 response")


def reason(body: bytes) -> str | None:
    try:
        return str(json.loads(body).get("reason"))
    except ValueError:
        return None


def test_a_lower_case_http2_method_is_never_judged_as_another_method(hard: HardStack) -> None:
    token = hard.reader()

    def h2(method: str) -> tuple[int, bytes]:
        base = [(":method", method), (":scheme", "http"), (":authority", f"127.0.0.1:{hard.port}")]
        return h2_request(hard.port, [*base, (":path", "/v1/orders/7"), ("authorization", f"Bearer {token}")])

    status, _ = h2("GET")
    assert status == 200  # the reader may read
    status, body = h2("DELETE")
    assert (status, reason(body)) == (403, R.ROLE_MISSING)
    for method in ("delete", "Delete", "dElEtE"):
        status, body = h2(method)
        assert (status, reason(body)) == (400, R.METHOD_INVALID), (method, status, body)
    assert [r for r in hard.app.requests() if r["method"] == "DELETE"] == []


def test_identity_headers_forged_with_underscores_or_case_never_reach_the_app(hard: HardStack) -> None:
    forged = {"x_authz_subject": "mallory", "x-authz_client_id": "evil", "X-Authz-Route": "admin"}
    token = hard.reader()
    for path, auth in (("/v1/public/a", {}), ("/v1/orders/7", {"authorization": f"Bearer {token}"})):
        for name, value in forged.items():
            r = hard.get("GET", path, {name: value, **auth})
            # Envoy refuses names with underscores (400); what it lets through, the agent removes or overwrites.
            assert r.status in (200, 400), (name, r.status, r.body)
            if r.status == 200:
                seen = json.loads(r.body)
                assert value not in json.dumps({k: v for k, v in seen.items() if k.startswith("HTTP_X_AUTHZ")})
    for r in hard.app.requests():
        assert not any(v in json.dumps(r) for v in forged.values()), r
    # The agent's own identity headers do reach it, with the agent's values.
    r = hard.get("GET", "/v1/orders/7", {"authorization": f"Bearer {token}", "X-Authz-Subject": "mallory"})
    assert r.status == 200 and json.loads(r.body)["HTTP_X_AUTHZ_SUBJECT"] == "alice"


def test_method_override_headers_never_reach_the_app(hard: HardStack) -> None:
    token = hard.reader()
    for name in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"):
        r = hard.get("POST", "/v1/orders/7", {"authorization": f"Bearer {token}", name: "DELETE"})
        assert r.status == 200, r.body
        seen = json.loads(r.body)
        assert seen["method"] == "POST"
        assert not [k for k in seen if "METHOD" in k], seen


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/v1/public/%252e%252e/admin/keys", R.PATH_DOUBLE_ENCODED),
        ("/v1/public/..;/admin/keys", R.MALFORMED_REQUEST),
        ("/v1/public/.%2e;x/admin/keys", R.MALFORMED_REQUEST),
    ],
)
def test_paths_an_upstream_reads_otherwise_are_refused(hard: HardStack, path: str, why: str) -> None:
    before = len(hard.app.requests())
    r = hard.get("GET", path)
    # Envoy's own normalisation may settle some first (`..;` read as `..`, then no route): never the app.
    assert (r.status, r.json()["reason"]) in ((400, why), (403, R.NO_ROUTE)), (r.status, r.body)
    assert len(hard.app.requests()) == before


def test_a_subject_with_surrounding_spaces_is_refused(hard: HardStack) -> None:
    """Envoy trims header values: " alice " would reach the app as alice, another identity."""
    token = hard.idp.mint(sub=" alice ", scope="orders:read")
    r = hard.get("GET", "/v1/orders/7", {"authorization": f"Bearer {token}"})
    assert (r.status, r.json()["reason"]) == (401, R.TOKEN_CLAIM_INVALID)
