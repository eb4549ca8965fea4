"""Resource limits of a real `authz-agent run` process, on both transports: malformed CheckRequests are
answered INVALID_ARGUMENT with one rate-limited log line."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc

from agent.server.native_transport import available
from tests.keys import SigningKey, mint

CHECK = "/envoy.service.auth.v3.Authorization/Check"
GRPC_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":authority", "x"),
    (":path", CHECK),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]
MB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["native", "grpcio"])
def transport(request: pytest.FixtureRequest) -> str:
    if request.param == "native" and not available():
        pytest.skip("native extensions not built (AGENT_NO_EXTENSIONS=1)")
    return str(request.param)


class Agent:
    """`authz-agent run` on a free port, stderr kept in a file."""

    def __init__(self, policy: Path, workdir: Path, transport: str, flags: list[str]) -> None:
        self.port = free_port()
        self.admin = f"127.0.0.1:{free_port()}"
        self.stderr_path = workdir / f"agent-{transport}.stderr"
        self._err = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "run",
                "--transport",
                transport,
                "--policy",
                str(policy),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--admin",
                self.admin,
                "--audit-log",
                str(workdir / f"audit-{transport}.log"),
                *flags,
            ],
            stdout=self._err,
            stderr=subprocess.STDOUT,
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = ext_grpc.AuthorizationStub(self.channel)

    def check(self, token: str, timeout: float = 5.0) -> Any:
        req = ext.CheckRequest()
        http = req.attributes.request.http
        http.method, http.path, http.host = "GET", "/v1/orders", "orders.local"
        http.headers["authorization"] = f"Bearer {token}"
        return self.stub.Check(req, timeout=timeout)

    def wait_serving(self, token: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.logs()
            try:
                if self.check(token, timeout=1).status.code == 0:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "agent not serving: " + self.logs()
            time.sleep(0.05)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {
            name: float(value)
            for line in text.splitlines()
            if line and not line.startswith("#")
            for name, _, value in [line.rpartition(" ")]
        }

    def logs(self) -> str:
        self._err.flush()
        return self.stderr_path.read_text()

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()


@pytest.fixture
def start_agent(write_policy: Callable[..., Path], tmp_path: Path, keys: dict[str, SigningKey]) -> Iterator[Any]:
    started: list[Agent] = []
    token = mint(keys["ES256"])

    def start(transport: str, *flags: str) -> Agent:
        agent = Agent(write_policy(), tmp_path, transport, list(flags))
        started.append(agent)
        agent.wait_serving(token)
        return agent

    yield start
    for agent in started:
        agent.stop()


def test_malformed_check_requests_are_invalid_argument_with_one_log_line(
    start_agent: Callable[..., Agent], transport: str
) -> None:
    agent = start_agent(transport)
    call = agent.channel.unary_unary(CHECK)
    n = 50
    for _ in range(n):
        with pytest.raises(grpc.RpcError) as e:
            call(b"\x0a\xff\xff", timeout=5)  # a length-delimited field that runs past the end
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Wire format" not in (e.value.details() or "")
    logs = agent.logs()
    lines = [ln for ln in logs.splitlines() if re.search(r"malformed", ln, re.I)]
    assert "Traceback" not in logs and "DecodeError" not in logs, logs
    assert 1 <= len(lines) <= 2, lines  # the first at once; the rest counted, said at most once a second
    assert all(len(ln) < 300 for ln in lines)
