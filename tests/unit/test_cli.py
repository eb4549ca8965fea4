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


def test_generated_configs_pass_envoy_validate(tmp_path: Path) -> None:
    configs = {
        "sidecar.json": (ROOT / "envoy" / "sidecar.json").read_text(),
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
