"""`make bench`: the agent side by side with its baselines in one run; a table on stdout, JSON in results/.

Server processes are pinned to CPU 0 and the load generators (h2load, wrk) to CPU 1. Every load is
bounded in time (BENCH_SECONDS each, default 5) and traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
from agent.envoyconf import EnvoyProcess, bootstrap, http_ok

ROOT = Path(__file__).resolve().parent.parent
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
SERVER_CPU, LOAD_CPU = "0", "1"
ISSUER, AUDIENCE = "https://idp.bench.test", "orders-api"
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


@contextmanager
def server(cmd: list[str], port: int, log: Path, ready_url: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *cmd], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_port(port)
            if ready_url:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not http_ok(ready_url):
                    time.sleep(0.05)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# "The order's owner OR a support agent": the bench token (sub alice, scope orders:read, no roles) is refused by
# the first two alternatives (role_missing, scope_missing) and let in by the third. Its `when` reads only claims,
# path parameters and the request line, so the allow is remembered; the clock-reading twin is judged every time.
ALTERNATIVE_ROUTES = """  - name: user-orders
    match: {methods: [GET], path: "/v1/users/{user}/orders"}
    authn: [jwt]
    allow:
      - {roles_any: [support]}
      - {scopes_all: [orders:admin]}
      - {scopes_all: [orders:read], when: 'claims.sub == params.user && request.method == "GET"'}
  - name: user-orders-by-clock
    match: {methods: [GET], path: "/v1/users/{user}/invoices"}
    authn: [jwt]
    allow:
      - {roles_any: [support]}
      - {scopes_all: [orders:admin]}
      - {scopes_all: [orders:read], when: 'claims.sub == params.user && now.getHours("Europe/Berlin") < 24'}
"""


class Fixture:
    """Keys, JWKS, policy, tokens and request bodies for one run."""

    def __init__(self, work: Path) -> None:
        from cryptography.hazmat.primitives import serialization as S
        from cryptography.hazmat.primitives.asymmetric import rsa
        from joserfc import jwt as jose_jwt
        from joserfc.jwk import RSAKey

        self.work = work
        private = rsa.generate_private_key(65537, 2048)
        pem = private.private_bytes(S.Encoding.PEM, S.PrivateFormat.PKCS8, S.NoEncryption())
        self.key = RSAKey.import_key(pem, {"kid": "bench-1"})
        self.private = private
        self.jwks = {"keys": [self.key.as_dict(private=False)]}
        (work / "jwks.json").write_text(json.dumps(self.jwks))
        (work / "policy.yaml").write_text(f"""version: 1
service: orders
identity_providers:
  bench:
    issuer: {ISSUER}
    jwks_file: jwks.json
    audiences: [{AUDIENCE}]
    algorithms: [RS256]
    max_token_lifetime_s: 3600
routes:
  - name: list-orders
    match: {{methods: [GET], path: /v1/orders}}
    authn: [jwt]
    allow: {{scopes_all: [orders:read]}}
default: deny
""")
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": "alice",
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 3500,
            "scope": "orders:read",
            "client_id": "bench",
            "jti": "bench-jti",
        }
        self.token = jose_jwt.encode({"alg": "RS256", "kid": "bench-1", "typ": "at+jwt"}, claims, self.key)
        self.allow_body = self.body(self.token)
        self.deny_body = self.body(None)
        # Policy v2 (its own file, so the rows above keep their policy): the old shape beside a route with three
        # alternatives whose third holds by a `when`, and the same with a `when` that reads the clock.
        self.alternatives_policy = work / "alternatives.yaml"
        self.alternatives_policy.write_text(
            (work / "policy.yaml").read_text().replace("routes:\n", "routes:\n" + ALTERNATIVE_ROUTES, 1)
        )
        self.alternatives_body = self.body(self.token, "/v1/users/alice/orders", "alternatives.bin")

    def body(self, token: str | None, path: str = "/v1/orders", name: str | None = None) -> Path:
        req = ext.CheckRequest()
        http = req.attributes.request.http
        http.method, http.path, http.host = "GET", path, "orders.local"
        http.headers["x-request-id"] = "bench"
        if token:
            http.headers["authorization"] = f"Bearer {token}"
        req.attributes.source.address.socket_address.address = "127.0.0.1"
        msg = req.SerializeToString()
        path = self.work / (name or ("allow.bin" if token else "deny.bin"))
        path.write_bytes(b"\0" + struct.pack(">I", len(msg)) + msg)
        return path


def h2load(port: int, body: Path, rps: int | None = None) -> dict[str, Any]:
    cmd = [
        "taskset",
        "-c",
        LOAD_CPU,
        "h2load",
        "-D",
        str(SECONDS),
        "--warm-up-time=1",
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
    ]
    cmd += ["-c", "1", "-m", "1", f"--rps={rps}"] if rps else ["-c", "4", "-m", "16"]
    cmd.append(f"http://127.0.0.1:{port}{CHECK_PATH}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 60, check=False).stdout
    m = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    done = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", out)
    return {
        "rps": float(m.group(1)) if m else 0.0,
        "latency_min": lat.group(1) if lat else None,
        "latency_max": lat.group(2) if lat else None,
        "latency_mean": lat.group(3) if lat else None,
        "succeeded": int(done.group(1)) if done else 0,
        "failed": int(done.group(2)) + int(done.group(3)) if done else 0,
    }


def wrk(port: int, token: str | None) -> dict[str, Any]:
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c16", f"-d{SECONDS}s", "--latency"]
    if token:
        cmd += ["-H", f"authorization: Bearer {token}"]
    cmd.append(f"http://127.0.0.1:{port}/v1/orders")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 60, check=False).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    lat = re.search(r"Latency\s+(\S+)\s+\S+\s+(\S+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(m.group(1)) if m else 0.0,
        "latency_mean": lat.group(1) if lat else None,
        "latency_max": lat.group(2) if lat else None,
        "non_2xx": int(bad.group(1)) if bad else 0,
    }


def agent_cmd(
    fx: Fixture,
    transport: str,
    port: int,
    admin: int,
    cache: int = 10_000,
    policy: Path | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    return [
        str(BIN / "authz-agent"),
        "run",
        "--transport",
        transport,
        "--policy",
        str(policy or fx.work / "policy.yaml"),
        "--listen",
        f"127.0.0.1:{port}",
        "--admin",
        f"127.0.0.1:{admin}",
        "--audit-log",
        str(fx.work / f"audit-{transport}-{port}.log"),
        "--token-cache-entries",
        str(cache),
        *extra,
    ]


def baseline_cmd(fx: Fixture, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.baselines.grpcio_pyjwt",
        "--listen",
        f"127.0.0.1:{port}",
        "--jwks",
        str(fx.work / "jwks.json"),
        "--issuer",
        ISSUER,
        "--audience",
        AUDIENCE,
    ]


def nghttpd_cmd(fx: Fixture, port: int) -> list[str]:
    docroot = fx.work / "nghttpd"
    (docroot / "envoy.service.auth.v3.Authorization").mkdir(parents=True, exist_ok=True)
    resp = ext.CheckResponse()
    resp.status.code = 0
    resp.ok_response.SetInParent()
    msg = resp.SerializeToString()
    (docroot / "envoy.service.auth.v3.Authorization" / "Check").write_bytes(b"\0" + struct.pack(">I", len(msg)) + msg)
    return ["nghttpd", "--no-tls", "-d", str(docroot), "--trailer", "grpc-status: 0", str(port)]


def direct_rows(fx: Fixture) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def run(name: str, cmd: list[str], port: int, workloads: dict[str, Path], ready: str | None = None) -> None:
        with server(cmd, port, fx.work / f"{name.replace(' ', '_')}.log", ready):
            for workload, body in workloads.items():
                r = h2load(port, body)
                rows.append({"group": "direct", "server": name, "workload": workload, **r})
                print(f"  direct  {name:<28} {workload:<9} {r['rps']:>10.0f} req/s  mean {r['latency_mean']}")

    both = {"repeated": fx.allow_body, "deny": fx.deny_body}
    p = free_port()
    run("grpcio+PyJWT (baseline)", baseline_cmd(fx, p), p, both)
    for transport in ("grpcio", "native"):
        p, a = free_port(), free_port()
        run(f"agent {transport}", agent_cmd(fx, transport, p, a), p, both, f"http://127.0.0.1:{a}/readyz")
        p, a = free_port(), free_port()
        run(
            f"agent {transport}",
            agent_cmd(fx, transport, p, a, cache=0),
            p,
            {"distinct": fx.allow_body},
            f"http://127.0.0.1:{a}/readyz",
        )
    p = free_port()
    run("nghttpd canned OK (limit)", nghttpd_cmd(fx, p), p, {"repeated": fx.allow_body})
    return rows


def probe(port: int, body: Path) -> int:
    """One Check over gRPC before a load: h2load counts any gRPC answer as a success, so a row of denies would
    pass unseen. Returns the google.rpc code of the answer (0: allowed)."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(CHECK_PATH, lambda b: b, ext.CheckResponse.FromString)
        return int(check(body.read_bytes()[5:], timeout=5).status.code)


def remembered_allows(admin: int) -> int | None:
    """The agent's count of decisions answered from a remembered allow (its /metrics)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as page:
        m = re.search(r"^authz_remembered_allows(?:_total)? (\S+)$", page.read().decode(), re.MULTILINE)
    return int(float(m.group(1))) if m else None


def alternatives_rows(fx: Fixture, earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Policy v2 beside the repeated-token row, the same way (direct gRPC, h2load -c4 -m16, each transport): a
    route of three alternatives whose third holds by a `when`, with the token cached (the remembered allow
    answers) and not (`--token-cache-entries 0`: a full verify and every alternative judged, `when` included,
    per request, as with distinct tokens). Then the in-process decisions (`alternatives_decide_rows`)."""
    rows: list[dict[str, Any]] = []

    def load(transport: str, workload: str, body: Path, cache: int, policy: Path | None) -> None:
        p, a = free_port(), free_port()
        cmd = agent_cmd(fx, transport, p, a, cache=cache, policy=policy)
        name = f"agent {transport}"
        with server(cmd, p, fx.work / f"alt-{transport}-{p}.log", f"http://127.0.0.1:{a}/readyz"):
            code = probe(p, body)
            if code != 0:
                raise RuntimeError(f"{name} {workload}: the probe was refused (gRPC status {code})")
            before = remembered_allows(a) or 0
            r = h2load(p, body)
            after = remembered_allows(a)
        r["remembered"] = after - before if after is not None else None
        rows.append({"group": "direct", "server": name, "workload": workload, **r})
        print(
            f"  direct  {name:<28} {workload:<21} {r['rps']:>10.0f} req/s  mean {r['latency_mean']}"
            f"  remembered {r['remembered']}"
        )

    def measured(transport: str, workload: str) -> bool:
        return any(r.get("server") == f"agent {transport}" and r.get("workload") == workload for r in earlier)

    for transport in ("grpcio", "native"):
        # The rows these are compared with, measured here when [direct] did not run (BENCH_ONLY=alternatives).
        if not measured(transport, "repeated"):
            load(transport, "repeated", fx.allow_body, 10_000, None)
        load(transport, "alternatives repeated", fx.alternatives_body, 10_000, fx.alternatives_policy)
        if not measured(transport, "distinct"):
            load(transport, "distinct", fx.allow_body, 0, None)
        load(transport, "alternatives distinct", fx.alternatives_body, 0, fx.alternatives_policy)
    return rows + alternatives_decide_rows(fx)


def alternatives_decide_rows(fx: Fixture) -> list[dict[str, Any]]:
    """One decision in process (`engine.decide`, the token's verification cached) on the old shape (one
    alternative), on three alternatives whose third holds by a `when` (remembered), and on three whose `when` reads
    `now` (never remembered: the alternatives and one CEL evaluation on every decision). Beside them, the old
    shape and the three alternatives judged on every decision (an engine that remembers no allow), and one `when`
    alone (its variables built and evaluated), so the cost of a CEL evaluation per decision shows."""
    import asyncio
    import timeit

    from agent.config import load_policy
    from agent.decision import Decision, RequestView
    from agent.engine import Engine
    from agent.policy.cel import When
    from agent.policy.conditions import Facts

    policy = load_policy(fx.alternatives_policy)
    engine = Engine.for_policy(policy)
    forgetful = Engine.for_policy(policy)
    forgetful._remember_max = 0  # the token cache stays; no allow is remembered, so every rule is judged

    async def load() -> None:
        for e in (engine, forgetful):
            for s in e.stores.values():
                await s.refresh()

    asyncio.run(load())
    headers = {"authorization": f"Bearer {fx.token}"}
    n = 2000
    cases = [
        # (row, engine, path, allowing alternative, remembered)
        ("one alternative (old shape), remembered", engine, "/v1/orders", 0, True),
        ("3 alternatives, 3rd by `when`, remembered", engine, "/v1/users/alice/orders", 2, True),
        ("3 alternatives, `when` reads now", engine, "/v1/users/alice/invoices", 2, False),
        ("one alternative (old shape), judged", forgetful, "/v1/orders", 0, False),
        ("3 alternatives, 3rd by `when`, judged", forgetful, "/v1/users/alice/orders", 2, False),
    ]
    rows = []
    for name, e, path, index, remembered in cases:
        view = RequestView("GET", path, "orders.local", headers, source="127.0.0.1")
        best = float("inf")
        for _ in range(3):
            hits = e.remembered_hits
            start = time.perf_counter()
            for _ in range(n):
                d = e.decide(view)
                assert isinstance(d, Decision) and d.allowed and d.allow_index == index, d
            best = min(best, (time.perf_counter() - start) / n)
            assert (e.remembered_hits - hits >= n - 1) is remembered, (name, e.remembered_hits - hits)
        rows.append({"group": "alternatives", "server": name, "us": round(best * 1e6, 2)})
        print(f"  decide  {name:<46} {best * 1e6:8.2f} us")
    principal = engine.jwt.verify_now(fx.token)
    routes = {r.name: r for r in policy.routes}
    for name, route, path in (
        ("one `when` alone (claims, params, method)", "user-orders", "/v1/users/alice/orders"),
        ("one `when` alone (reads now, Europe/Berlin)", "user-orders-by-clock", "/v1/users/alice/invoices"),
    ):
        when = routes[route].allow[2].when
        assert when is not None
        view = RequestView("GET", path, "orders.local", headers, source="127.0.0.1")

        def evaluate(when: When = when, view: RequestView = view) -> bool | None:
            return when.result(Facts(view, principal, {"user": "alice"}, time.time()).variables(when.names))

        assert evaluate() is True
        best = min(timeit.repeat(evaluate, number=n, repeat=3)) / n
        rows.append({"group": "alternatives", "server": name, "us": round(best * 1e6, 2)})
        print(f"  when    {name:<46} {best * 1e6:8.2f} us")
    return rows


def latency_rows(fx: Fixture) -> list[dict[str, Any]]:
    rows = []
    p = free_port()
    with server(baseline_cmd(fx, p), p, fx.work / "lat-baseline.log"):
        rows.append({"group": "latency@1k", "server": "grpcio+PyJWT (baseline)", **h2load(p, fx.allow_body, 1000)})
    p, a = free_port(), free_port()
    with server(agent_cmd(fx, "native", p, a), p, fx.work / "lat-native.log", f"http://127.0.0.1:{a}/readyz"):
        rows.append({"group": "latency@1k", "server": "agent native", **h2load(p, fx.allow_body, 1000)})
    p = free_port()
    with server(nghttpd_cmd(fx, p), p, fx.work / "lat-nghttpd.log"):
        # The floor: a zero-work C server's round trip at the same rate on this machine.
        rows.append({"group": "latency@1k", "server": "nghttpd canned OK (limit)", **h2load(p, fx.allow_body, 1000)})
    for r in rows:
        print(f"  1k/s    {r['server']:<28} mean {r['latency_mean']}  max {r['latency_max']}")
    return rows


def envoy_config(listen: int, authz: int | None, jwt_rbac: Fixture | None = None) -> dict[str, Any]:
    cfg = bootstrap(f"127.0.0.1:{listen}", "127.0.0.1:1", f"127.0.0.1:{authz or 1}")
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    # The "app" is Envoy's own direct response, so every row measures Envoy plus authorization only.
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [
        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
    ]
    filters = hcm["http_filters"]
    if authz is None:
        filters.pop(0)
        cfg["static_resources"]["clusters"] = [
            c for c in cfg["static_resources"]["clusters"] if c["name"] != "authz_agent"
        ]
    if jwt_rbac is not None:
        jwt_filter = {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {
                    "bench": {
                        "issuer": ISSUER,
                        "audiences": [AUDIENCE],
                        "payload_in_metadata": "jwt",
                        "local_jwks": {"inline_string": json.dumps(jwt_rbac.jwks)},
                    }
                },
                "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}],
            },
        }
        rbac = {
            "name": "envoy.filters.http.rbac",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                "rules": {
                    "action": "ALLOW",
                    "policies": {
                        "scope": {
                            "permissions": [{"any": True}],
                            "principals": [
                                {
                                    "metadata": {
                                        "filter": "envoy.filters.http.jwt_authn",
                                        "path": [{"key": "jwt"}, {"key": "scope"}],
                                        "value": {"string_match": {"exact": "orders:read"}},
                                    }
                                }
                            ],
                        }
                    },
                },
            },
        }
        filters[0:0] = [jwt_filter, rbac]
    return cfg


def envoy_rows(fx: Fixture) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def run(name: str, cfg: dict[str, Any], token: str | None) -> None:
        env = EnvoyProcess(cfg, fx.work / f"envoy-{len(rows)}")
        env.start()
        subprocess.run(["taskset", "-pc", SERVER_CPU, str(env.proc.pid)], capture_output=True, check=False)
        try:
            r = wrk(cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"], token)
        finally:
            env.stop()
        rows.append({"group": "envoy", "server": name, **r})
        print(f"  envoy   {name:<34} {r['rps']:>10.0f} req/s  mean {r['latency_mean']}  non-2xx {r['non_2xx']}")

    run("Envoy alone", envoy_config(free_port(), None), None)
    run("Envoy + jwt_authn + rbac", envoy_config(free_port(), None, fx), fx.token)
    p = free_port()
    with server(nghttpd_cmd(fx, p), p, fx.work / "envoy-nghttpd.log"):
        run("Envoy + ideal ext_authz (nghttpd)", envoy_config(free_port(), p), fx.token)
    for transport in ("grpcio", "native"):
        p, a = free_port(), free_port()
        with server(
            agent_cmd(fx, transport, p, a), p, fx.work / f"envoy-agent-{transport}.log", f"http://127.0.0.1:{a}/readyz"
        ):
            run(f"Envoy + agent {transport}", envoy_config(free_port(), p), fx.token)
    return rows


def trace_spans(admin: int) -> dict[str, int]:
    """The agent's count of spans exported, failed and dropped (its /metrics)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as page:
        found = re.findall(r'^authz_trace_spans(?:_total)?\{result="(\w+)"\} (\S+)$', page.read().decode(), re.M)
    return {k: int(float(v)) for k, v in found}


def tracing_rows(fx: Fixture) -> list[dict[str, Any]]:
    """A span per decision (--otlp-endpoint) beside the same load without it: the native agent on the direct
    repeated load (new traces sampled at the default 0.01, and every one at 1.0: the worst case) and through Envoy
    (0.01), exporting by OTLP/gRPC to a loopback collector that discards (benchmarks/otlp_sink.py, on CPU 1).
    h2load and wrk send no traceparent, so every decision is a new trace, sampled at the ratio."""
    rows: list[dict[str, Any]] = []
    sink = free_port()
    sink_cmd = ["taskset", "-c", LOAD_CPU, sys.executable, "-m", "benchmarks.otlp_sink", "--port", str(sink)]
    with (fx.work / "otlp-sink.log").open("wb") as out:
        collector = subprocess.Popen(sink_cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_port(sink)
        for ratio in (None, "0.01", "1.0"):
            extra = () if ratio is None else ("--otlp-endpoint", f"grpc://127.0.0.1:{sink}", "--trace-sample", ratio)
            p, a = free_port(), free_port()
            cmd = agent_cmd(fx, "native", p, a, extra=extra)
            with server(cmd, p, fx.work / f"trace-{ratio}.log", f"http://127.0.0.1:{a}/readyz"):
                r = h2load(p, fx.allow_body)
                spans = {f"spans_{k}": v for k, v in trace_spans(a).items()} if ratio else {}
            name = "tracing off" if ratio is None else f"tracing {ratio}"
            rows.append({"group": "tracing", "server": "agent native", "workload": f"repeated, {name}", **r, **spans})
            print(f"  tracing direct {name:<13} {r['rps']:>10.0f} req/s  mean {r['latency_mean']}  spans {spans}")
        for ratio in (None, "0.01"):
            extra = () if ratio is None else ("--otlp-endpoint", f"grpc://127.0.0.1:{sink}", "--trace-sample", ratio)
            p, a = free_port(), free_port()
            cmd = agent_cmd(fx, "native", p, a, extra=extra)
            with server(cmd, p, fx.work / f"trace-envoy-{ratio}.log", f"http://127.0.0.1:{a}/readyz"):
                listen = free_port()
                env = EnvoyProcess(envoy_config(listen, p), fx.work / f"envoy-trace-{ratio}")
                env.start()
                subprocess.run(["taskset", "-pc", SERVER_CPU, str(env.proc.pid)], capture_output=True, check=False)
                try:
                    r = wrk(listen, fx.token)
                finally:
                    env.stop()
                spans = {f"spans_{k}": v for k, v in trace_spans(a).items()} if ratio else {}
            name = "tracing off" if ratio is None else f"tracing {ratio}"
            rows.append({"group": "tracing", "server": "Envoy + agent native", "workload": name, **r, **spans})
            print(f"  tracing envoy  {name:<13} {r['rps']:>10.0f} req/s  mean {r['latency_mean']}  spans {spans}")
    finally:
        collector.terminate()
        collector.wait(10)
    return rows


def verify_rows(fx: Fixture) -> list[dict[str, Any]]:
    import asyncio
    import itertools
    import timeit

    import jwt as pyjwt
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from agent.authn.jwks import KeyStore
    from agent.authn.jwt import JwtVerifier
    from agent.authn.strict import b64url_decode
    from agent.config import load_policy

    store = KeyStore(load_policy(fx.work / "policy.yaml").identity_providers[0])

    async def load() -> None:
        await store.refresh()

    asyncio.run(load())
    # A miss as a running agent has it: the cache on (the token hashed, looked up, the entry kept) and full, so
    # every call verifies: two tokens take turns in a one-entry cache.
    verifier = JwtVerifier({"bench": store}, cache_entries=1)
    cached = JwtVerifier({"bench": store})
    from joserfc import jwt as jose_jwt

    claims = {**jose_jwt.decode(fx.token, fx.key).claims, "jti": "bench-jti-2"}
    turns = itertools.cycle(
        [fx.token, jose_jwt.encode({"alg": "RS256", "kid": "bench-1", "typ": "at+jwt"}, claims, fx.key)]
    )
    pyjwt_key = pyjwt.PyJWK(fx.jwks["keys"][0])
    public = fx.private.public_key()
    head, payload, sig = fx.token.split(".")
    si, raw_sig = f"{head}.{payload}".encode(), b64url_decode(sig)

    def bare() -> None:
        public.verify(raw_sig, si, padding.PKCS1v15(), hashes.SHA256())

    cases = {
        "OpenSSL floor (cryptography verify)": bare,
        "PyJWT decode": lambda: pyjwt.decode(
            fx.token, pyjwt_key, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER
        ),
        "agent verify (cache miss)": lambda: verifier.verify_now(next(turns)),
        "agent verify (cache hit)": lambda: cached.verify_now(fx.token),
    }
    rows = []
    for name, fn in cases.items():
        fn()
        n = 3000
        best = min(timeit.repeat(fn, number=n, repeat=3)) / n
        rows.append({"group": "verify", "server": name, "us": round(best * 1e6, 2)})
        print(f"  verify  {name:<36} {best * 1e6:8.2f} us")
    return rows


def pop_rows(fx: Fixture) -> list[dict[str, Any]]:
    """One decision (engine.decide, in process) for a plain bearer JWT, a DPoP-bound JWT with a fresh proof,
    and an RFC 9421 signed request with a fresh nonce. Proofs and nonces are single use, so every timed
    request carries its own, made before the clock starts (h2load can only repeat one body)."""
    import asyncio
    import base64
    import hashlib
    import uuid

    from joserfc import jws
    from joserfc import jwt as jose_jwt
    from joserfc.jwk import ECKey

    from agent.config import load_policy
    from agent.decision import RequestView
    from agent.demo.client import sign_request
    from agent.engine import Engine

    hmac_key = b"bench-hmac-key-of-at-least-32-bytes"
    (fx.work / "billing.key").write_text(base64.b64encode(hmac_key).decode())
    text = (
        (fx.work / "policy.yaml")
        .read_text()
        .replace(
            "routes:\n",
            "hmac_clients:\n  billing: {key_file: billing.key, roles: [billing]}\nroutes:\n"
            "  - name: billing\n    match: {methods: [POST], path: /v1/billing}\n    authn: [hmac]\n"
            "    allow: {roles_any: [billing]}\n"
            "  - name: limited\n    match: {methods: [GET], path: /v1/limited}\n    authn: [jwt]\n    allow: {}\n"
            "    rate_limit: {key: subject, per_second: 1000000000}\n",
        )
    )
    (fx.work / "pop-policy.yaml").write_text(text)
    engine = Engine.for_policy(load_policy(fx.work / "pop-policy.yaml"))

    async def load() -> None:
        for s in engine.stores.values():
            await s.refresh()

    asyncio.run(load())
    client = ECKey.generate_key("P-256", private=True)
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "carol", "aud": AUDIENCE, "iat": now, "exp": now + 3500, "scope": "orders:read"}
    bound = jose_jwt.encode(
        {"alg": "RS256", "kid": "bench-1", "typ": "at+jwt"}, {**claims, "cnf": {"jkt": client.thumbprint()}}, fx.key
    )
    url = "https://orders.local/v1/orders"
    ath = base64.urlsafe_b64encode(hashlib.sha256(bound.encode()).digest()).rstrip(b"=").decode()
    jwk = client.as_dict(private=False)
    body = b"x" * 1024
    n = 2000

    def plain() -> list[RequestView]:
        return [RequestView("GET", "/v1/orders", "orders.local", {"authorization": f"Bearer {fx.token}"})] * n

    def limited() -> list[RequestView]:
        return [RequestView("GET", "/v1/limited", "orders.local", {"authorization": f"Bearer {fx.token}"})] * n

    def dpop() -> list[RequestView]:
        views = []
        for _ in range(n):
            c = {"jti": uuid.uuid4().hex, "htm": "GET", "htu": url, "iat": int(time.time()), "ath": ath}
            proof = jws.serialize_compact(
                {"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}, json.dumps(c).encode(), client, algorithms=["ES256"]
            )
            headers = {"authorization": f"DPoP {bound}", "dpop": proof}
            views.append(RequestView("GET", "/v1/orders", "orders.local", headers, scheme="https"))
        return views

    def signed() -> list[RequestView]:
        views = []
        for _ in range(n):
            headers = sign_request("POST", "https://orders.local/v1/billing", body, hmac_key, "billing")
            headers["content-length"] = str(len(body))
            views.append(RequestView("POST", "/v1/billing", "orders.local", headers, scheme="https", body=body))
        return views

    import timeit

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    pk = ec.generate_private_key(ec.SECP256R1())
    sig = pk.sign(b"x" * 300, ec.ECDSA(hashes.SHA256()))
    pub = pk.public_key()
    floor = min(timeit.repeat(lambda: pub.verify(sig, b"x" * 300, ec.ECDSA(hashes.SHA256())), number=n, repeat=3)) / n
    rows = [{"group": "pop", "server": "OpenSSL ES256 verify (the proof's floor)", "us": round(floor * 1e6, 2)}]
    print(f"  verify  {rows[0]['server']:<46} {floor * 1e6:8.2f} us")
    for name, make in {
        "bearer JWT, repeated (remembered allow)": plain,
        "the same on a rate-limited route": limited,
        "DPoP-bound JWT + fresh ES256 proof": dpop,
        "RFC 9421 hmac-sha256 + Content-Digest (1 KiB)": signed,
    }.items():
        best = float("inf")
        for _ in range(3):
            views = make()
            start = time.perf_counter()
            for v in views:
                d = engine.decide(v)
                assert d is not None and d.allowed, d
            best = min(best, (time.perf_counter() - start) / n)
        rows.append({"group": "pop", "server": name, "us": round(best * 1e6, 2)})
        print(f"  decide  {name:<46} {best * 1e6:8.2f} us")
    rows.append(shared_quota_row(fx, n))
    return rows


def shared_quota_row(fx: Fixture, n: int) -> dict[str, Any]:
    """The repeated-token decision on a limit shared through a real Redis (leases; the loop awaits the
    decisions that wait for one)."""
    import asyncio

    from agent.config import load_policy
    from agent.decision import Decision, RequestView
    from agent.engine import Engine
    from agent.ratelimit.shared import SharedState
    from tests.redis_server import RedisServer

    redis = RedisServer(fx.work / "redis")
    redis.start()
    try:
        text = (fx.work / "pop-policy.yaml").read_text()
        text = text.replace("per_second: 1000000000}", "per_second: 1000000, shared: true}")
        text = text.replace("routes:\n", f"shared_state: {{redis: {redis.url}}}\nroutes:\n", 1)
        (fx.work / "shared-policy.yaml").write_text(text)
        policy = load_policy(fx.work / "shared-policy.yaml")

        async def run() -> float:
            state = SharedState(redis.url)
            engine = Engine.for_policy(policy, shared=state)
            for s in engine.stores.values():
                await s.refresh()
            view = RequestView("GET", "/v1/limited", "orders.local", {"authorization": f"Bearer {fx.token}"})
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(n):
                    d = engine.decide(view)
                    if not isinstance(d, Decision):
                        d = await d
                    assert d.allowed, d
                best = min(best, (time.perf_counter() - start) / n)
            await state.close()
            return best

        best = asyncio.run(run())
        overshoot = asyncio.run(measure_overshoot(fx, redis.url))
    finally:
        redis.stop()
    name = "the same on a limit shared through Redis"
    print(f"  decide  {name:<46} {best * 1e6:8.2f} us")
    print(
        f"  shared  2 replicas, 100/s burst 100 (batch 10), {overshoot['seconds']} s flat out: "
        f"{overshoot['admitted']} admitted, allowance {overshoot['allowance']}, "
        f"overshoot {overshoot['overshoot']} (bound {overshoot['bound']})"
    )
    return {"group": "pop", "server": name, "us": round(best * 1e6, 2), "overshoot": overshoot}


async def measure_overshoot(fx: Fixture, url: str, seconds: float = 2.0) -> dict[str, Any]:
    """Two replicas (engines with their own Redis clients) drain one shared quota as fast as they can."""
    from agent.config import load_policy
    from agent.decision import Decision, RequestView
    from agent.engine import Engine
    from agent.ratelimit.shared import SharedState

    text = (fx.work / "shared-policy.yaml").read_text().replace("per_second: 1000000,", "per_second: 100,")
    (fx.work / "overshoot-policy.yaml").write_text(text)
    policy = load_policy(fx.work / "overshoot-policy.yaml")
    states = [SharedState(url, prefix="authz:overshoot:") for _ in range(2)]
    engines = [Engine.for_policy(policy, shared=st) for st in states]
    for e in engines:
        for s in e.stores.values():
            await s.refresh()
    view = RequestView("GET", "/v1/limited", "orders.local", {"authorization": f"Bearer {fx.token}"})
    admitted = 0
    start = time.monotonic()
    i = 0
    while (elapsed := time.monotonic() - start) < seconds:
        d = engines[i % 2].decide(view)
        if not isinstance(d, Decision):
            d = await d
        admitted += d.allowed
        i += 1
        if i % 50 == 0:
            await asyncio.sleep(0)  # let prefetched leases land
    for st in states:
        await st.close()
    allowance = round(100 * elapsed + 100)
    return {
        "seconds": round(elapsed, 2),
        "admitted": admitted,
        "allowance": allowance,
        "overshoot": admitted - allowance,
        "bound": 2 * 10,
    }


def bucket_memory_row() -> dict[str, Any]:
    """RSS growth of one limited route's bucket table after 1M distinct keys (a key flood)."""
    code = (
        "import json, time\n"
        "from benchmarks.memory import rss_mb\n"
        "from agent.ratelimit._bucket import BucketTable\n"
        "t = BucketTable(1.0, 10.0, 100_000)\n"
        "before = rss_mb(); start = time.perf_counter()\n"
        "for i in range(1_000_000): t.take(f'10.{i >> 16}.{(i >> 8) & 255}.{i & 255}', 1000.0 + i * 1e-6)\n"
        "print(json.dumps({'keys': 1_000_000, 'held': len(t), 'rss_growth_mb': round(rss_mb() - before, 1),"
        " 'us_per_key': round((time.perf_counter() - start) * 1e6 / 1_000_000, 2)}))\n"
    )
    out = subprocess.run(
        ["taskset", "-c", SERVER_CPU, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        cwd=ROOT,
    )
    row = {"group": "memory", "server": "rate-limit buckets (one route)", **json.loads(out.stdout.strip())}
    print(f"  memory  1000000 distinct limit keys: {row['held']} held, RSS +{row['rss_growth_mb']} MB")
    return row


def memory_row() -> dict[str, Any]:
    n = int(os.environ.get("BENCH_TOKENS", "1000000"))
    out = subprocess.run(
        ["taskset", "-c", SERVER_CPU, sys.executable, "-m", "benchmarks.memory", str(n)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
        cwd=ROOT,
    )
    row = {
        "group": "memory",
        "server": "agent (engine, default cache)",
        **json.loads(out.stdout.strip().splitlines()[-1]),
    }
    print(f"  memory  {n} distinct tokens: RSS +{row['rss_growth_mb']} MB ({row['seconds']} s)")
    return row


def micros(text: str) -> float:
    """h2load's time ("195us", "1.29ms", "2s") in microseconds."""
    for unit, scale in (("us", 1.0), ("ms", 1e3), ("s", 1e6)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def ratio(rows: list[dict[str, Any]], a: tuple[str, ...], b: tuple[str, ...]) -> float | None:
    def find(key: tuple[str, ...]) -> dict[str, Any] | None:
        return next(
            (r for r in rows if tuple(r.get(k) for k in ("group", "server", "workload")[: len(key)]) == key), None
        )

    ra, rb = find(a), find(b)
    if not ra or not rb or not rb.get("rps"):
        return None
    return round(ra["rps"] / rb["rps"], 2)


def main() -> int:
    for tool in ("h2load", "nghttpd", "wrk", "taskset"):
        if not shutil.which(tool):
            print(f"{tool} is missing: run 'make system-deps'", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="authz-bench-"))
    fx = Fixture(work)
    print(f"authz-agent benchmarks: {SECONDS} s per load, server on CPU {SERVER_CPU}, load on CPU {LOAD_CPU}")
    rows: list[dict[str, Any]] = []
    only = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
    sections = [
        ("direct", direct_rows),
        ("alternatives", lambda fx: alternatives_rows(fx, rows)),
        ("latency", latency_rows),
        ("envoy", envoy_rows),
        ("tracing", tracing_rows),
        ("verify", verify_rows),
        ("pop", pop_rows),
    ]
    for name, fn in sections:
        if not only or name in only:
            print(f"[{name}]")
            rows += fn(fx)
    if not only or "memory" in only:
        print("[memory]")
        rows.append(bucket_memory_row())
        rows.append(memory_row())
    base = ("direct", "grpcio+PyJWT (baseline)", "repeated")
    ratios = {
        "native/baseline repeated": ratio(rows, ("direct", "agent native", "repeated"), base),
        "native/baseline distinct": ratio(rows, ("direct", "agent native", "distinct"), base),
        "native/baseline deny": ratio(
            rows, ("direct", "agent native", "deny"), ("direct", "grpcio+PyJWT (baseline)", "deny")
        ),
        "grpcio agent/baseline repeated": ratio(rows, ("direct", "agent grpcio", "repeated"), base),
        "nghttpd/baseline": ratio(rows, ("direct", "nghttpd canned OK (limit)", "repeated"), base),
        "envoy+native/envoy+ideal": ratio(
            rows, ("envoy", "Envoy + agent native"), ("envoy", "Envoy + ideal ext_authz (nghttpd)")
        ),
        "envoy+grpcio/envoy+ideal": ratio(
            rows, ("envoy", "Envoy + agent grpcio"), ("envoy", "Envoy + ideal ext_authz (nghttpd)")
        ),
    }
    ratios["native/nghttpd repeated"] = ratio(
        rows, ("direct", "agent native", "repeated"), ("direct", "nghttpd canned OK (limit)", "repeated")
    )
    lat = {r["server"]: r for r in rows if r["group"] == "latency@1k"}
    if "agent native" in lat and "nghttpd canned OK (limit)" in lat:
        mine, ideal = lat["agent native"], lat["nghttpd canned OK (limit)"]
        if mine["latency_mean"] and ideal["latency_mean"]:
            ratios["latency@1k native mean/nghttpd mean"] = round(
                micros(mine["latency_mean"]) / micros(ideal["latency_mean"]), 2
            )
        if mine["latency_max"]:
            ratios["latency@1k native max (ms)"] = round(micros(mine["latency_max"]) / 1000, 2)
    for t in ("native", "grpcio"):
        rep = ("direct", f"agent {t}", "repeated")
        for w in ("alternatives repeated", "alternatives distinct"):
            ratios[f"{t} {w}/repeated"] = ratio(rows, ("direct", f"agent {t}", w), rep)
        ratios[f"{t} alternatives distinct/distinct"] = ratio(
            rows, ("direct", f"agent {t}", "alternatives distinct"), ("direct", f"agent {t}", "distinct")
        )
    alt = {r["server"]: r["us"] for r in rows if r["group"] == "alternatives"}
    if alt:
        old = alt["one alternative (old shape), remembered"]
        ratios["3 alternatives remembered/old shape"] = round(alt["3 alternatives, 3rd by `when`, remembered"] / old, 2)
        ratios["`when` reads now/old shape remembered"] = round(alt["3 alternatives, `when` reads now"] / old, 2)
        ratios["`when` reads now/old shape judged"] = round(
            alt["3 alternatives, `when` reads now"] / alt["one alternative (old shape), judged"], 2
        )
    for name, a, b in (
        ("tracing 0.01/off direct repeated", "repeated, tracing 0.01", "repeated, tracing off"),
        ("tracing 1.0/off direct repeated", "repeated, tracing 1.0", "repeated, tracing off"),
    ):
        ratios[name] = ratio(rows, ("tracing", "agent native", a), ("tracing", "agent native", b))
    ratios["envoy tracing 0.01/off"] = ratio(
        rows, ("tracing", "Envoy + agent native", "tracing 0.01"), ("tracing", "Envoy + agent native", "tracing off")
    )
    verify = {r["server"]: r["us"] for r in rows if r["group"] == "verify"}
    if verify:
        ratios["agent miss/OpenSSL floor"] = round(
            verify["agent verify (cache miss)"] / verify["OpenSSL floor (cryptography verify)"], 2
        )
    pop = {r["server"]: r["us"] for r in rows if r["group"] == "pop"}
    if pop:
        plain = pop["bearer JWT, repeated (remembered allow)"]
        ratios["DPoP decision/plain JWT decision"] = round(pop["DPoP-bound JWT + fresh ES256 proof"] / plain, 2)
        ratios["DPoP decision/ES256 verify"] = round(
            pop["DPoP-bound JWT + fresh ES256 proof"] / pop["OpenSSL ES256 verify (the proof's floor)"], 2
        )
        ratios["limited decision/unlimited decision"] = round(pop["the same on a rate-limited route"] / plain, 2)
        ratios["shared-limit decision/local-limit decision"] = round(
            pop["the same on a limit shared through Redis"] / pop["the same on a rate-limited route"], 2
        )
        ratios["signed decision/plain JWT decision"] = round(
            pop["RFC 9421 hmac-sha256 + Content-Digest (1 KiB)"] / plain, 2
        )
    print("\nratios:")
    for k, v in ratios.items():
        print(f"  {k:<40} {v if v is not None else 'n/a'}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    doc = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds_per_load": SECONDS,
        "rows": rows,
        "ratios": ratios,
        "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
    }
    (results / "latest.json").write_text(json.dumps(doc, indent=1))
    print(f"\nsaved {results / 'latest.json'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
