"""The image recipe and the Kubernetes and Istio examples, checked without an image builder or a cluster.

No image can be built here (no registry for base images): the recipe is parsed and its layout checked, the
manifests are validated offline against Kubernetes' schemas, and the Istio custom resources, whose schemas are
not Kubernetes', structurally. Installing the same wheel and running it unprivileged is tests/packaging's.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROUTES, idp_block
from tests.wait import until

ROOT = Path(__file__).parent.parent.parent
RECIPE = ROOT / "envoy" / "container" / "Containerfile"
KUBE = ROOT / "envoy" / "kubernetes"
KUBERNETES_VERSION = "1.33"  # the oldest release the examples are meant for; its schemas ship in kubernetes-validate
POLICY_DIR, STATE_DIR = "/etc/authz-agent", "/var/lib/authz-agent"
COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cython|[\w.+-]+-dev)\b", re.IGNORECASE)
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments), continuations joined

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.steps if i == instruction]


def parse_recipe(text: str) -> list[Stage]:
    """Stages of a Containerfile: comments and parser directives dropped, backslash continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # a comment inside a continued instruction does not end it
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "the recipe ends inside a continued line"
    stages: list[Stage] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, line
            stages.append(Stage(m[1], m[2]))
        else:
            assert stages, f"{instruction} before FROM"
            stages[-1].steps.append((instruction, rest))
    return stages


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD/HEALTHCHECK CMD (a shell form would hide the PID 1)."""
    import json

    assert arguments.startswith("["), f"not exec form: {arguments}"
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_recipe(RECIPE.read_text())


def manifests(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def agent_container(doc: dict[str, Any]) -> dict[str, Any]:
    containers = doc["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "authz-agent")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def opt(args: list[str], name: str) -> str:
    """The value of --name=VALUE or --name VALUE in an argument list."""
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name:
            return args[i + 1]
    raise AssertionError(f"{name} not in {args}")


def test_the_recipe_builds_in_one_stage_and_runs_in_a_slim_one(stages: list[Stage]) -> None:
    assert len(stages) == 2
    build, final = stages
    assert build.name == "build" and build.base.startswith("python:3.11-slim")
    assert final.base.startswith("python:3.11-slim")
    built = " ".join(build.args("RUN"))
    assert "build-essential" in built and "libnghttp2-dev" in built and "libssl-dev" in built
    assert "make dist" in built and "authz_agent-*-manylinux*.whl" in built  # the repaired wheel, not a plain build
    # The final stage takes wheels from the build stage only: no source, no compiler, no -dev package.
    assert final.args("COPY") == [] and final.args("ADD") == []
    final_runs = " ".join(final.args("RUN"))
    assert "apt-get" not in final_runs, final_runs
    assert COMPILERS.findall(final_runs) == []
    (install,) = [r for r in final.args("RUN") if "pip install" in r]
    assert "--no-cache-dir" in install and "--no-index" in install and "from=build" in install
    assert "[demo]" not in install and "authz_agent-*.whl" in install


def test_the_image_runs_as_an_unprivileged_user_with_its_two_directories(stages: list[Stage]) -> None:
    final = stages[-1]
    (user,) = final.args("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) == 10001  # numeric, so runAsNonRoot can verify it without /etc/passwd
    setup = " ".join(final.args("RUN"))
    assert "useradd" in setup and "--uid 10001" in setup and " authz" in setup
    assert f"mkdir -p {POLICY_DIR} {STATE_DIR}" in setup
    assert f"chown 10001:10001 {STATE_DIR}" in setup and f"chown 10001:10001 {POLICY_DIR}" not in setup
    assert final.args("WORKDIR") == [STATE_DIR]
    assert STATE_DIR in final.args("VOLUME")[0]
    assert final.args("EXPOSE") == ["9191 9192"]
    assert any("PYTHONDONTWRITEBYTECODE=1" in e for e in final.args("ENV"))  # the root filesystem is read-only


def image_env(stage: Stage) -> dict[str, str]:
    """The stage's ENV KEY=VALUE pairs (the only form the recipe uses)."""
    pairs = [w.partition("=") for e in stage.args("ENV") for w in shlex.split(e)]
    assert all(sep for _, sep, _ in pairs), stage.args("ENV")
    return {k: v for k, _, v in pairs}


def health_check(stage: Stage) -> list[str]:
    (check,) = stage.args("HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    return exec_form(command.strip())


def test_the_health_check_asks_readyz_on_the_port_cmd_binds(stages: list[Stage]) -> None:
    final = stages[-1]
    argv = health_check(final)
    assert argv[:2] == ["python", "-c"] and "urllib.request" in argv[2] and "curl" not in argv[2]
    compile(argv[2], "<healthcheck>", "exec")  # the one-liner is Python that at least compiles
    # The port comes from the image's ENV, not written into the check: it and CMD's --admin say the same port.
    assert "os.environ['AUTHZ_AGENT_ADMIN_PORT']" in argv[2] and "/readyz" in argv[2]
    assert not re.search(r"\b\d{4,5}\b", argv[2]), "a port written into the health check"
    port = image_env(final)["AUTHZ_AGENT_ADMIN_PORT"]
    admin = opt(exec_form(final.args("CMD")[0]), "--admin")
    assert admin.rsplit(":", 1) in (["0.0.0.0", port], ["127.0.0.1", port])  # loopback reaches it
    assert port in final.args("EXPOSE")[0].split()


def test_the_health_check_tells_a_ready_agent_from_one_that_is_not(
    stages: list[Stage], write_policy: Callable[..., Path], tmp_path: Path
) -> None:
    """The recipe's own one-liner, run against real agents: exit 0 once /readyz answers 200, 1 while the agent
    is up but not ready (its identity provider's keys cannot load), and 1 with nothing on the port."""
    argv = [sys.executable, *health_check(stages[-1])[1:]]  # the image's `python` is this one here

    def check(port: int) -> int:
        env = {**os.environ, "AUTHZ_AGENT_ADMIN_PORT": str(port)}
        return subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False).returncode

    def start(policy: Path) -> tuple[subprocess.Popen[bytes], int]:
        admin = free_port()
        cmd = [sys.executable, "-m", "agent", "run", "--policy", str(policy), "--listen", f"127.0.0.1:{free_port()}"]
        cmd += ["--admin", f"127.0.0.1:{admin}", "--audit-log", str(policy.parent / "audit.log")]
        with (policy.parent / "agent.log").open("wb") as log:
            return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT), admin

    def alive(proc: subprocess.Popen[bytes], port: int) -> bool:
        assert proc.poll() is None, f"the agent exited with {proc.returncode}: {proc.args}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    closed = free_port()
    assert check(closed) == 1  # nothing listens
    ready_policy = write_policy()  # its identity provider reads a JWKS file beside it
    unready_policy = tmp_path / "unready" / "policy.yaml"  # a directory of its own: the agents re-read on change
    unready_policy.parent.mkdir()
    keys_nowhere = idp_block(f"jwks_uri: http://127.0.0.1:{closed}/jwks.json")
    unready_policy.write_text("version: 1\nservice: orders\n" + keys_nowhere + ROUTES)
    ready, ready_port = start(ready_policy)
    unready, unready_port = start(unready_policy)
    try:
        until(lambda: alive(ready, ready_port) and check(ready_port) == 0, "the health check passes", timeout=60)
        until(lambda: alive(unready, unready_port), "the agent without keys serves /healthz", timeout=60)
        assert check(unready_port) == 1, (unready_policy.parent / "agent.log").read_text()  # alive, not ready
    finally:
        for proc in (ready, unready):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def test_the_default_command_uses_flags_run_has(stages: list[Stage]) -> None:
    final = stages[-1]
    (entrypoint,) = final.args("ENTRYPOINT")
    (cmd,) = final.args("CMD")
    assert exec_form(entrypoint) == ["authz-agent"]
    argv = exec_form(cmd)
    assert argv[0] == "run"
    assert opt(argv, "--policy") == f"{POLICY_DIR}/policy.yaml"
    assert opt(argv, "--listen") == "0.0.0.0:9191" and opt(argv, "--admin") == "0.0.0.0:9192"
    assert opt(argv, "--audit-log") == f"{STATE_DIR}/audit.log"
    helptext = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    for flag in (a for a in argv if a.startswith("--")):
        assert re.search(rf"(^|\s){re.escape(flag)}\b", helptext), f"`authz-agent run` has no {flag}"


def ignore_rules() -> list[tuple[bool, str, re.Pattern[str]]]:
    """.containerignore as (re-included?, pattern, regex): `*` and `?` within a path segment, `**` across them."""
    rules = []
    for raw in (ROOT / ".containerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        assert not set("[\\") & set(pattern), f"{line}: the matcher here knows only *, ** and ?"
        rx = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rules.append((negated, pattern, re.compile(rx)))
    return rules


def in_context(path: str, rules: list[tuple[bool, str, re.Pattern[str]]]) -> bool:
    """Whether the image build sees `path`, as Docker and BuildKit decide: the last rule that matches the path or
    one of its parent directories wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negated, _, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negated
    return not ignored


def test_the_build_context_leaves_local_builds_out() -> None:
    rules = ignore_rules()
    assert {".git", ".venv", "build", "dist", "**/*.so", "**/__pycache__"} <= {p for _, p, _ in rules}
    assert (ROOT / ".dockerignore").resolve() == (ROOT / ".containerignore").resolve()  # docker reads only this name
    ls = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    if ls.returncode != 0:
        pytest.skip("not a git checkout: no list of the repository's files")
    tracked = ls.stdout.splitlines()
    # A `!` line brings back a file the lines before it leave out: one that matches nothing is a misspelt path.
    for negated, pattern, rx in rules:
        if negated:
            assert any(rx.fullmatch(f) for f in tracked), f"!{pattern} matches no file in the repository"
    # `make dist` in the build stage needs the sources, the build files and README (pyproject's readme).
    needed = [f for f in tracked if f.split("/")[0] in ("agent", "native", "proto")]
    needed += ["setup.py", "pyproject.toml", "MANIFEST.in", "Makefile", "README.md"]
    assert len(needed) > 100 and "native/includes/auditq_api.h" in needed
    assert [f for f in needed if not in_context(f, rules)] == []
    # What a local build made stays out (the build stage makes its own, for its own Python).
    for made in ("agent/_h2_c.cpython-311-x86_64-linux-gnu.so", "native/_h2.c", "agent/__pycache__/cli.cpython-311.pyc",
                 ".venv/bin/python", "build/dist-raw/x.whl", "agent/controlplane/_proto/authz/x_pb2.py"):  # fmt: skip
        assert not in_context(made, rules), made


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
def test_hadolint_passes() -> None:
    r = subprocess.run(["hadolint", str(RECIPE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", [KUBE / "orders.yaml", KUBE / "istio" / "orders.yaml"], ids=["envoy", "istio"])
def test_the_agent_container_matches_the_recipe(path: Path, stages: list[Stage]) -> None:
    deployment = next(d for d in manifests(path) if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    agent = agent_container(deployment)
    assert agent["image"] == f"authz-agent:{VERSION}"
    sc = agent["securityContext"]
    uid = int(stages[-1].args("USER")[0].split(":")[0])
    assert sc["runAsUser"] == uid and sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts[POLICY_DIR]["readOnly"] is True and "configMap" in volumes[mounts[POLICY_DIR]["name"]]
    assert "emptyDir" in volumes[mounts[STATE_DIR]["name"]] and not mounts[STATE_DIR].get("readOnly")
    # Every file the agent reads or writes lies in a mount: nothing else is writable, nor brought in.
    args = agent["args"]
    assert args[0] == "run"
    assert opt(args, "--policy") == f"{POLICY_DIR}/policy.yaml"
    assert opt(args, "--audit-log").startswith(STATE_DIR + "/")
    listen = opt(args, "--listen")
    if listen.startswith("unix:"):
        assert str(Path(listen[5:]).parent) in mounts
    else:
        assert listen.startswith("127.0.0.1:")  # Istio's proxy calls it inside the pod; nothing outside can
    admin = opt(args, "--admin")
    assert admin.startswith("0.0.0.0:")  # the kubelet probes the pod's address
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in (agent["readinessProbe"], agent["livenessProbe"]):
        assert ports[probe["httpGet"]["port"]] == int(admin.rsplit(":", 1)[1])
    recipe_dirs = " ".join(stages[-1].args("RUN"))
    assert all(d in recipe_dirs for d in (POLICY_DIR, STATE_DIR))


@pytest.mark.parametrize("path", [KUBE / "orders.yaml", KUBE / "istio" / "orders.yaml"], ids=["envoy", "istio"])
def test_only_the_front_port_is_open_to_all(path: Path) -> None:
    """The admin port binds the pod's address (for the kubelet, whose probes NetworkPolicy always lets through from
    the pod's node): a NetworkPolicy admits every peer to the pod's front port only, the admin port to a selected
    monitoring peer at most, and no Service names the admin or the ext_authz port."""
    docs = manifests(path)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    agent = agent_container(deployment)
    containers = pod["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for c in containers for p in c.get("ports", []) if "name" in p}

    def number(port: int | str) -> int:
        return port if isinstance(port, int) else named[port]

    # The front port: Envoy's listener beside the agent, or the app's port that Istio's injected proxy takes.
    front_container = next(c for c in containers if c["name"] == ("app" if "istio" in str(path) else "envoy"))
    (front,) = [p["containerPort"] for p in front_container["ports"]]
    admin = int(opt(agent["args"], "--admin").rsplit(":", 1)[1])
    listen = opt(agent["args"], "--listen")
    agent_ports = {admin} | ({int(listen.rsplit(":", 1)[1])} if not listen.startswith("unix:") else set())

    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert "Ingress" in spec["policyTypes"]
    for rule in spec["ingress"]:
        ports = {number(p["port"]) for p in rule["ports"]}  # a rule without ports would admit every port
        assert all(p.get("protocol", "TCP") == "TCP" and "endPort" not in p for p in rule["ports"])
        if "from" not in rule:
            assert ports == {front}, f"open to every peer: {ports}"
        else:
            assert ports.isdisjoint(agent_ports - {admin}), "the ext_authz port admitted"
            for peer in rule["from"]:  # a selected peer, never an address range
                assert set(peer) == {"namespaceSelector", "podSelector"} and all(
                    v["matchLabels"] for v in peer.values()
                )
    for service in (d for d in docs if d["kind"] == "Service"):
        targets = {number(p.get("targetPort", p["port"])) for p in service["spec"]["ports"]}
        assert targets == {front}, f"Service {service['metadata']['name']} names {targets}"
    assert "Never put the admin port" in path.read_text()


UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity(text: str) -> int:
    """A Kubernetes quantity of bytes (the forms a sizeLimit takes) in bytes."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", text)
    assert m, f"not a byte quantity: {text}"
    return int(m[1]) * UNITS.get(m[2] or "", 1)


def audit_defaults(tmp_path: Path) -> tuple[int, int, int]:
    """(files the audit log keeps, bytes each may reach, bytes one sink's spool may hold on disk) at the agent's
    defaults, read from the code that `run` uses."""
    import ast
    import inspect

    from agent.audit.sinks import DEFAULT_SPOOL_BYTES
    from agent.audit.spool import Spool
    from agent.audit.writer import JsonLinesAudit

    # `run` builds the writer with its defaults: neither size given (then the signature's defaults are the real ones).
    tree = ast.parse((ROOT / "agent" / "server" / "run.py").read_text())
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "JsonLinesAudit"]
    assert len(call.args) <= 3 and not {k.arg for k in call.keywords} & {"max_bytes", "keep"}, ast.unparse(call)
    params = inspect.signature(JsonLinesAudit).parameters
    max_bytes, keep = params["max_bytes"].default, params["keep"].default
    # A spool's disk use passes its bound by at most one segment (agent/audit/spool.py): the segment size it picks.
    spool = Spool(tmp_path / "spool", DEFAULT_SPOOL_BYTES)
    try:
        segment = spool.segment_bytes
    finally:
        spool.close()
    return keep + 1, max_bytes, DEFAULT_SPOOL_BYTES + segment


@pytest.mark.parametrize("path", [KUBE / "orders.yaml", KUBE / "istio" / "orders.yaml"], ids=["envoy", "istio"])
def test_the_state_volume_holds_what_the_agent_keeps_there(path: Path, tmp_path: Path) -> None:
    """The kubelet evicts a pod whose emptyDir passes its sizeLimit: the limit covers the rotated audit log and each
    sink's spool at the agent's defaults, and the comment's sum is those defaults (a change to either fails)."""
    files, file_bytes, spool_bytes = audit_defaults(tmp_path)
    deployment = next(d for d in manifests(path) if d["kind"] == "Deployment")
    agent = agent_container(deployment)
    state = next(m["name"] for m in agent["volumeMounts"] if m["mountPath"] == STATE_DIR)
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == state)
    limit = quantity(volume["emptyDir"]["sizeLimit"])
    # The spools live beside the audit log (AUDIT-LOG.spool/) unless --audit-spool-dir moves them elsewhere.
    assert opt(agent["args"], "--audit-log").startswith(STATE_DIR + "/") and "--audit-spool-dir" not in str(agent)
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip() == f"- name: {state}")
    start = at
    while lines[start - 1].strip().startswith("#"):
        start -= 1
    comment = "\n".join(lines[start:at])
    terms = [tuple(map(int, t)) for t in re.findall(r"(\d+) x (\d+)Mi = (\d+)Mi", comment)]
    assert len(terms) == 2, comment
    (n_files, file_mi, log_mi), (n_sinks, sink_mi, sinks_mi) = terms
    assert (n_files, file_mi << 20) == (files, file_bytes), "the log's line is stale"
    assert sink_mi << 20 == spool_bytes, "the sink's line is stale"
    # Sized for the sinks the args name, and at least one: the comment invites adding one.
    sinks = sum(a == "--audit-sink" or a.startswith("--audit-sink=") for a in agent["args"])
    assert n_sinks >= max(1, sinks)
    assert log_mi == n_files * file_mi and sinks_mi == n_sinks * sink_mi
    (total,) = re.findall(r"sum\b.*?(\d+)Mi\s*$", comment, re.MULTILINE)
    assert int(total) == log_mi + sinks_mi
    assert limit >= (log_mi + sinks_mi) << 20, f"sizeLimit {volume['emptyDir']['sizeLimit']} < {total}Mi"
    assert f"{volume['emptyDir']['sizeLimit']} leaves {(limit >> 20) - int(total)}Mi" in comment


@pytest.mark.parametrize("path", [KUBE / "orders.yaml", KUBE / "istio" / "orders.yaml"], ids=["envoy", "istio"])
def test_core_resources_validate_against_the_kubernetes_schemas(path: Path) -> None:
    import kubernetes_validate  # [dev]; imported here so that the recipe's checks run without it

    core = [d for d in manifests(path) if "istio.io" not in d["apiVersion"]]
    assert {d["kind"] for d in core} >= {"Deployment", "Service", "NetworkPolicy"}
    for doc in core:
        # strict: an unknown or misspelt field fails instead of being dropped by the API server
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_fails_validation() -> None:
    """The validation above can fail: a securityContext field misspelt is caught offline."""
    import kubernetes_validate

    deployment = next(d for d in manifests(KUBE / "orders.yaml") if d["kind"] == "Deployment")
    agent_container(deployment)["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_istio_resources_fit_together() -> None:
    """Structurally only: Istio's CRDs are not among Kubernetes' schemas."""
    (operator,) = manifests(KUBE / "istio" / "mesh-config.yaml")
    assert operator["apiVersion"] == "install.istio.io/v1alpha1" and operator["kind"] == "IstioOperator"
    providers = {p["name"]: p for p in operator["spec"]["meshConfig"]["extensionProviders"]}
    grpc = providers["authz-agent"]["envoyExtAuthzGrpc"]
    assert set(grpc) >= {"service", "port", "timeout"} and grpc["failOpen"] is False
    assert re.fullmatch(r"\d+(\.\d+)?s", grpc["timeout"])
    docs = {d["kind"]: d for d in manifests(KUBE / "istio" / "orders.yaml")}
    policy = docs["AuthorizationPolicy"]
    assert policy["apiVersion"] == "security.istio.io/v1"
    assert policy["spec"]["action"] == "CUSTOM" and policy["spec"]["provider"]["name"] in providers
    assert policy["spec"]["rules"]
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    entry = docs["ServiceEntry"]
    assert entry["apiVersion"] == "networking.istio.io/v1"
    assert grpc["service"] in entry["spec"]["hosts"] and entry["spec"]["resolution"] == "STATIC"
    assert [e["address"] for e in entry["spec"]["endpoints"]] == ["127.0.0.1"]
    (port,) = entry["spec"]["ports"]
    assert port["number"] == grpc["port"] and port["protocol"] == "GRPC"
    listen = opt(agent_container(docs["Deployment"])["args"], "--listen")
    assert listen == f"127.0.0.1:{grpc['port']}"


def test_the_istio_readme_merges_the_provider_it_ships() -> None:
    """mesh-config.yaml applied as is replaces a mesh's meshConfig: both say so, and the README's two merge
    snippets (an installer overlay, istiod's config map) carry exactly the provider the file has."""
    (operator,) = manifests(KUBE / "istio" / "mesh-config.yaml")
    provider = operator["spec"]["meshConfig"]["extensionProviders"]
    header = (KUBE / "istio" / "mesh-config.yaml").read_text().split("\napiVersion:")[0]
    readme = (KUBE / "istio" / "README.md").read_text()
    for text in (header, readme):
        assert "MERGE" in text.upper() and "kubectl -n istio-system edit configmap istio" in text
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL)]
    overlay = next(b for b in blocks if "spec" in b)
    assert overlay["spec"]["meshConfig"]["extensionProviders"] == provider
    configmap = next(b for b in blocks if "data" in b)
    assert yaml.safe_load(configmap["data"]["mesh"])["extensionProviders"] == provider


def test_the_readme_says_how_to_build_and_install() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.index("## Install") < readme.index("## Using it")
    install = readme[readme.index("## Install") : readme.index("## Using it")]
    build = shlex.split(next(line for line in install.splitlines() if "podman build" in line))
    assert build[build.index("-f") + 1] == str(RECIPE.relative_to(ROOT))
    assert build[build.index("-t") + 1] == f"authz-agent:{VERSION}"
    for path in ("envoy/kubernetes/orders.yaml", "envoy/kubernetes/istio/"):
        assert path in install and (ROOT / path).exists()
