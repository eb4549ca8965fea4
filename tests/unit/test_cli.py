"""`authz-agent check` and `envoy-config` as a service owner and a platform team run them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from agent.envoyconf import bootstrap, find_envoy
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
