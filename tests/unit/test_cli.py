"""`authz-agent check` and `envoy-config` as a service owner and a platform team run them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.envoyconf import bootstrap, find_envoy
from tests.conftest import ROUTES
from tests.keys import SigningKey, claims, mint

ROOT = Path(__file__).parent.parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60)


def test_check_explains_an_allow(write_policy: Callable[..., Path], keys: dict[str, SigningKey]) -> None:
    token = mint(keys["ES256"])
    r = run("check", "--policy", str(write_policy()), "--path", "/v1/orders", "-H", f"authorization: Bearer {token}")
    assert r.returncode == 0, r.stderr
    assert "- route 'list-orders'" in r.stdout and "- authenticated by jwt: subject 'alice'" in r.stdout
    out = json.loads(r.stdout[r.stdout.index("\n{") :])
    assert out["decision"] == "allow" and out["upstream_headers"]["x-authz-subject"] == "alice"
    assert token not in r.stdout + r.stderr


def test_check_explains_a_deny_and_exits_1(write_policy: Callable[..., Path], keys: dict[str, SigningKey]) -> None:
    token = mint(keys["ES256"], claims(scope="profile"))
    r = run("check", "--policy", str(write_policy()), "--path", "/v1/orders", "-H", f"authorization: Bearer {token}")
    assert r.returncode == 1
    assert "allow rule refused: scope_missing (missing scopes orders:read)" in r.stdout
    assert json.loads(r.stdout[r.stdout.index("\n{") :])["status"] == 403


def test_committed_sidecar_config_is_what_envoy_config_generates() -> None:
    r = run("envoy-config")
    assert r.returncode == 0
    assert json.loads(r.stdout) == json.loads((ROOT / "envoy" / "sidecar.json").read_text())
    assert json.loads(run("envoy-config", "--listen", "10000").stdout) == json.loads(r.stdout)  # a bare port


TLS_ARGS = (
    "--request-body",
    "--tls-cert",
    "/etc/authz/tls/server.pem",
    "--tls-key",
    "/etc/authz/tls/server.key",
    "--client-ca",
    "/etc/authz/tls/clients-ca.pem",
)


def test_committed_tls_config_is_what_envoy_config_generates() -> None:
    r = run("envoy-config", *TLS_ARGS)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads((ROOT / "envoy" / "sidecar-tls.json").read_text())


def test_envoy_config_reads_what_a_policy_needs(tmp_path: Path, write_policy: Callable[..., Path]) -> None:
    (tmp_path / "b.key").write_text("cXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXE=\n")
    signed = write_policy(
        "hmac_clients: {b: {key_file: b.key}}\nroutes:\n"
        "  - {name: s, match: {path: /s}, authn: [hmac], allow: {}}\n"
        "  - {name: m, match: {path: /m}, authn: [jwt], bind: mtls, allow: {}}\n"
    )
    r = run("envoy-config", "--policy", str(signed))
    assert r.returncode == 1 and "bind: mtls" in r.stderr
    r = run("envoy-config", "--policy", str(signed), *TLS_ARGS[1:])
    ext = json.loads(r.stdout)["static_resources"]["listeners"][0]["filter_chains"][0]
    typed = ext["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]
    assert typed["with_request_body"]["pack_as_bytes"] is True and typed["include_peer_certificate"] is True
    tls = ext["transport_socket"]["typed_config"]
    assert tls["common_tls_context"]["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"].endswith("clients-ca.pem")


def test_generated_configs_pass_envoy_validate(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    server.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls_text = (ROOT / "envoy" / "sidecar-tls.json").read_text()
    tls_text = tls_text.replace("/etc/authz/tls/server.pem", str(tmp_path / "server.pem"))
    tls_text = tls_text.replace("/etc/authz/tls/server.key", str(tmp_path / "server.pem"))
    tls_text = tls_text.replace("/etc/authz/tls/clients-ca.pem", str(tmp_path / "ca.pem"))
    configs = {
        "sidecar.json": (ROOT / "envoy" / "sidecar.json").read_text(),
        "sidecar-tls.json": tls_text,
        "unix.json": json.dumps(bootstrap("127.0.0.1:10000", "127.0.0.1:8080", "unix:/run/authz.sock")),
    }
    for name, text in configs.items():
        (tmp_path / name).write_text(text)
        v = subprocess.run(
            [find_envoy(), "--mode", "validate", "-c", str(tmp_path / name), "--use-dynamic-base-id"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert v.returncode == 0, v.stdout + v.stderr


def test_the_kubernetes_example_is_consistent(tmp_path: Path) -> None:
    import yaml

    from agent.config import load_policy_text

    docs = list(yaml.safe_load_all((ROOT / "envoy" / "kubernetes" / "orders.yaml").read_text()))
    maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    policy = load_policy_text(maps["orders-authz-policy"]["policy.yaml"], "orders.yaml")
    assert policy.service == "orders"
    r = run("envoy-config", "--upstream", "127.0.0.1:8080", "--agent", "unix:/run/authz/agent.sock",
            "--listen", "0.0.0.0:10000", "--admin", "127.0.0.1:9901")  # fmt: skip
    assert json.loads(r.stdout) == json.loads(maps["orders-envoy"]["envoy.json"])
    (tmp_path / "envoy.json").write_text(maps["orders-envoy"]["envoy.json"])
    v = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(tmp_path / "envoy.json"), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert v.returncode == 0, v.stdout + v.stderr
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert "--listen=unix:/run/authz/agent.sock" in containers["authz-agent"]["args"]


def _hcm(cfg: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def test_generated_config_follows_envoys_edge_guidance() -> None:
    cfg = json.loads((ROOT / "envoy" / "sidecar.json").read_text())
    hcm = _hcm(cfg)
    # Issue 11, item 2: `x_authz_subject` reads as X-Authz-Subject in WSGI apps; Envoy refuses the name.
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == "REJECT_REQUEST"
    # Clients are external: Envoy writes X-Forwarded-For/-Proto and drops their x-envoy-* control headers.
    assert hcm["use_remote_address"] is True
    assert hcm.get("xff_num_trusted_hops", 0) == 0 and hcm.get("skip_xff_append", False) is False
    assert hcm["normalize_path"] is True and hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    assert hcm["http2_protocol_options"] == {
        "max_concurrent_streams": 100,
        "initial_stream_window_size": 65536,
        "initial_connection_window_size": 1048576,
    }
    timeouts = (hcm["request_headers_timeout"], hcm["request_timeout"], hcm["stream_idle_timeout"])
    assert timeouts == ("10s", "300s", "300s")
    vhost = hcm["route_config"]["virtual_hosts"][0]
    overrides = {"x-http-method-override", "x-http-method", "x-method-override", "x-original-url", "x-rewrite-url"}
    claims = {"forwarded", "x-forwarded-host", "x-forwarded-port", "x-forwarded-prefix", "x-real-ip"}
    assert set(vhost["request_headers_to_remove"]) == overrides | claims
    assert vhost["request_headers_to_add"] == [
        {
            "header": {"key": "x-forwarded-for", "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]
    resources = cfg["static_resources"]
    assert resources["listeners"][0]["per_connection_buffer_limit_bytes"] == 32768
    assert {c["name"]: c["per_connection_buffer_limit_bytes"] for c in resources["clusters"]} == {
        "app": 32768,
        "authz_agent": 32768,
    }
    overload = cfg["overload_manager"]
    monitors = {m["name"]: m["typed_config"] for m in overload["resource_monitors"]}
    assert monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"] == str(512 << 20)
    assert monitors["envoy.resource_monitors.global_downstream_max_connections"]["max_active_downstream_connections"]
    actions = {a["name"]: a["triggers"][0]["threshold"]["value"] for a in overload["actions"]}
    assert actions == {
        "envoy.overload_actions.shrink_heap": 0.95,
        "envoy.overload_actions.stop_accepting_requests": 0.98,
    }


def test_request_bodies_for_the_agent_are_buffered_beyond_the_connection_limit() -> None:
    hcm = _hcm(json.loads((ROOT / "envoy" / "sidecar-tls.json").read_text()))
    assert hcm["route_config"]["virtual_hosts"][0]["routes"][0]["request_body_buffer_limit"] == 1 << 20
    assert "request_body_buffer_limit" not in json.dumps(json.loads((ROOT / "envoy" / "sidecar.json").read_text()))


def test_envoy_config_flags_for_trusted_proxies_heap_and_connections() -> None:
    r = run("envoy-config", "--trusted-hops", "2", "--max-heap-mb", "256", "--max-connections", "500")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert _hcm(cfg)["xff_num_trusted_hops"] == 2
    # Behind a proxy you run, what it says about the client's host and address is its own: kept.
    vhost = _hcm(cfg)["route_config"]["virtual_hosts"][0]
    assert "x-forwarded-host" not in vhost["request_headers_to_remove"]
    monitors = {m["name"]: m["typed_config"] for m in cfg["overload_manager"]["resource_monitors"]}
    assert monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"] == str(256 << 20)
    assert (
        monitors["envoy.resource_monitors.global_downstream_max_connections"]["max_active_downstream_connections"]
        == "500"
    )
    assert run("envoy-config", "--trusted-hops", "-1").returncode == 1


def _ext_authz_timeout(cfg: dict[str, Any]) -> str:
    return str(_hcm(cfg)["http_filters"][0]["typed_config"]["grpc_service"]["timeout"])


INTROSPECTING = (
    "introspection_endpoint: http://127.0.0.1:9/introspect\nclient_id: agent\nclient_secret_file: secret\n{extra}"
)
SHARED = "shared_state: {redis: 'redis://127.0.0.1:6379/0'}\n"


def test_default_timeouts_work_with_common_servers_and_fit_envoys(
    tmp_path: Path, write_policy: Callable[..., Path]
) -> None:
    from agent.config import load_policy
    from agent.envoyconf import DEFAULT_TIMEOUT_MS, decision_wait_ms, ext_authz_timeout_ms

    (tmp_path / "secret").write_text("s3cret\n")
    # Every timeout at its default: the slowest decision introspects and goes to Redis twice.
    policy = load_policy(write_policy(SHARED + ROUTES, extra_idp=INTROSPECTING.format(extra="")))
    introspection = policy.identity_providers[0].introspection
    assert introspection is not None and introspection.timeout_s >= 1.0  # DOT: 0.35-0.64 s per call measured
    assert decision_wait_ms(policy) == 2100
    assert ext_authz_timeout_ms(decision_wait_ms(policy)) <= DEFAULT_TIMEOUT_MS == 2400
    assert _ext_authz_timeout(json.loads((ROOT / "envoy" / "sidecar.json").read_text())) == "2.400s"


def test_envoy_config_with_a_policy_fits_the_ext_authz_timeout_to_it(
    tmp_path: Path, write_policy: Callable[..., Path]
) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    slow = write_policy(extra_idp=INTROSPECTING.format(extra="introspection_timeout_s: 3\n"))
    assert _ext_authz_timeout(json.loads(run("envoy-config", "--policy", str(slow)).stdout)) == "3.300s"
    jwt_only = write_policy()  # an unknown kid waits 250 ms for a refetch: 500 ms, the floor
    assert _ext_authz_timeout(json.loads(run("envoy-config", "--policy", str(jwt_only)).stdout)) == "0.500s"
    shared = write_policy(SHARED + ROUTES)  # + a replay check and a quota lease, 50 ms each
    assert _ext_authz_timeout(json.loads(run("envoy-config", "--policy", str(shared)).stdout)) == "0.600s"


def test_lint_says_when_a_policys_timeouts_cannot_fit_inside_envoys(
    tmp_path: Path, write_policy: Callable[..., Path]
) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    fits = write_policy(extra_idp=INTROSPECTING.format(extra=""))
    r = run("policy", "lint", str(fits))
    assert r.returncode == 0 and "warning" not in r.stderr
    slow = write_policy(extra_idp=INTROSPECTING.format(extra="introspection_timeout_s: 5\n"))
    r = run("policy", "lint", str(slow))  # against what envoy-config writes without --policy: a warning
    assert r.returncode == 0 and ": ok (" in r.stdout
    assert "warning: one decision may wait 5000 ms" in r.stderr
    assert "identity_providers.corp.introspection_timeout_s 5000 ms" in r.stderr and "5300 ms" in r.stderr
    r = run("policy", "lint", str(slow), "--envoy-timeout-ms", "2400")  # against a deployed Envoy: an error
    assert r.returncode == 1 and "error: one decision may wait 5000 ms" in r.stderr and "(2400 ms)" in r.stderr
    r = run("policy", "lint", str(slow), "--envoy-timeout-ms", "5300")
    assert r.returncode == 0 and "warning" not in r.stderr
