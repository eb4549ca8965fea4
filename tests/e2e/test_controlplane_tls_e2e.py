"""The control-plane channel as an operator runs it: `authz-agent control-plane` with TLS 1.3 and client
certificates (a trustme CA, SPIFFE URI SANs), agents as `authz-agent run` processes. Who is refused, what /status
says of it, certificates and agents.yaml rotated without a restart, and the --insecure rules."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from agent.controlplane._proto.authz.controlplane.v1 import policy_sync_pb2 as pb
from agent.controlplane.server import SYNC_METHOD
from agent.controlplane.tls import cert_summary, fingerprint
from tests.certs import AGENTS_YAML, BILLING_ID, ORDERS_ID, Pki
from tests.e2e.conftest import AgentProcess, free_port
from tests.e2e.test_controlplane_e2e import ControlPlaneProcess
from tests.wait import until

pytestmark = pytest.mark.e2e

POLICY = "version: 1\nservice: {service}\nroutes:\n  - {{name: health, match: {{path: /healthz}}, public: true}}\n"
STRANGER_ID = "spiffe://example.org/ns/shop/sa/stranger"


@dataclass
class Plane:
    work: Path
    pki: Pki
    verify: Path
    key: Path
    policies: Path
    cp: ControlPlaneProcess
    agents: list[AgentProcess] = field(default_factory=list)

    def agent(self, name: str, service: str, cert: str, *, ready: bool = True) -> AgentProcess:
        work = self.work / f"agent-{name}"
        work.mkdir()
        args = ["--control-plane", f"127.0.0.1:{self.cp.port}", "--service", service,
                "--state-dir", str(work / "state"), "--bundle-key", str(self.verify),
                *self.pki.agent_args(cert)]  # fmt: skip
        agent = AgentProcess(args, f"127.0.0.1:{free_port()}", work, "grpcio", wait_ready=ready)
        self.agents.append(agent)
        return agent

    def refusals(self, reason: str) -> list[dict[str, Any]]:
        return [r for r in self.cp.status()["refusals"]["last"] if r["reason"] == reason]

    def connected(self, service: str) -> list[dict[str, Any]]:
        return [a for a in self.cp.status()["agents"] if a["service"] == service and a["connected"]]


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    work = tmp_path_factory.mktemp("cp-tls")
    subprocess.run([sys.executable, "-m", "agent", "control-plane", "--keygen", str(work / "keys")], check=True)
    pki = Pki(work)
    pki.leaf("orders", ORDERS_ID)
    pki.leaf("billing", BILLING_ID)
    pki.leaf("stranger", STRANGER_ID)
    pki.leaf("rogue", ORDERS_ID, ca=trustme.CA())  # the right name from a CA the control plane does not trust
    policies = work / "policies"
    policies.mkdir()
    for service in ("orders", "billing"):
        (policies / f"{service}.yaml").write_text(POLICY.format(service=service))
    key = work / "keys" / "bundle-signing.pem"
    p = Plane(work, pki, work / "keys" / "bundle-verify.pem", key, policies, ControlPlaneProcess(policies, key, work,
              pki=pki))  # fmt: skip
    try:
        yield p
    finally:
        for a in p.agents:
            a.stop()
        p.cp.stop()


def readyz(agent: AgentProcess) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://{agent.admin}/readyz", timeout=2) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def served_fingerprint(port: int, pki: Pki) -> str:
    """The certificate the control plane presents to a new connection, as the test's own TLS client sees it."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with pki.client_context("admin").wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return fingerprint(der)


def raw_sync(plane: Plane, cert: str | None, messages: list[pb.AgentMessage], hold: threading.Event) -> Any:
    """A Sync stream from the test itself (grpc, TLS with `cert` or none), held open until `hold` is set."""
    ca = plane.pki.ca_path.read_bytes()
    if cert is None:
        creds = grpc.ssl_channel_credentials(ca)
    else:
        crt, key = plane.pki.paths(cert)
        creds = grpc.ssl_channel_credentials(ca, key.read_bytes(), crt.read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{plane.cp.port}", creds)

    def requests() -> Iterator[pb.AgentMessage]:
        yield from messages
        hold.wait(20)

    call = channel.stream_stream(SYNC_METHOD, request_serializer=pb.AgentMessage.SerializeToString,
                                 response_deserializer=pb.ControlMessage.FromString)(requests())  # fmt: skip
    return channel, call


def test_an_agent_with_its_services_certificate_fetches_and_enforces(plane: Plane) -> None:
    agent = plane.agent("orders", "orders", "orders")  # ready: it holds the bundle
    status = plane.cp.status()
    orders = plane.connected("orders")
    assert [a["identity"] for a in orders] == [ORDERS_ID]
    assert orders[0]["version"] == status["services"]["orders"]["version"]
    assert orders[0]["cert_fingerprint"] == cert_summary(plane.pki.paths("orders")[0].read_bytes())["fingerprint"]
    code, body = readyz(agent)
    assert code == 200 and body["control_plane"]["connected"] and body["control_plane"]["connection_error"] is None
    assert body["control_plane"]["tls"]["certificate"]["names"] == [ORDERS_ID]


def test_an_agent_without_a_certificate_or_with_an_untrusted_one_is_refused(plane: Plane) -> None:
    hold = threading.Event()
    channel, call = raw_sync(plane, None, [pb.AgentMessage(hello=pb.Hello(service="orders"))], hold)
    try:
        with pytest.raises(grpc.RpcError) as e:
            next(iter(call))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # refused in the handshake: nothing was sent
    finally:
        hold.set()
        channel.close()
    until(lambda: plane.refusals("no_certificate"), "no_certificate in /status")
    refusal = plane.refusals("no_certificate")[-1]
    assert refusal["identity"] is None and refusal["port"] == "sync" and refusal["peer"].startswith("127.0.0.1:")
    # A real agent whose certificate has the right name but comes from another CA.
    rogue = plane.agent("rogue", "orders", "rogue", ready=False)
    until(lambda: plane.refusals("certificate_invalid"), "certificate_invalid in /status")
    assert "certificate verify failed" in plane.refusals("certificate_invalid")[-1]["detail"]
    until(lambda: readyz(rogue)[1]["control_plane"]["connection_error"], "the refused agent says why")
    assert readyz(rogue)[0] == 503 and rogue.proc.poll() is None
    assert plane.cp.status()["refusals"]["counts"]["certificate_invalid"] >= 1


def test_an_identity_not_in_agents_yaml_is_refused(plane: Plane) -> None:
    """Right after the handshake, on both ports: an unknown identity is never forwarded, so it cannot hold a
    connection to the internal servers (the agent sees a closed connection; /status says why)."""
    stranger = plane.agent("stranger", "orders", "stranger", ready=False)
    until(lambda: plane.refusals("identity_unknown"), "identity_unknown in /status")
    refusal = plane.refusals("identity_unknown")[-1]
    assert (refusal["identity"], refusal["service"], refusal["port"]) == (STRANGER_ID, None, "sync")
    assert "no entry in the agents file" in refusal["detail"]
    until(lambda: readyz(stranger)[1]["control_plane"]["connection_error"], "the agent shows it is not connected")
    assert not any(a["identity"] == STRANGER_ID for a in plane.cp.status()["agents"])
    with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError, http_errors())):
        plane.cp.get("/status", "stranger")
    until(lambda: [r for r in plane.refusals("identity_unknown") if r["port"] == "admin"], "refused on admin too")


def test_the_orders_certificate_cannot_fetch_billing(plane: Plane) -> None:
    thief = plane.agent("thief", "billing", "orders", ready=False)
    until(lambda: plane.refusals("service_not_allowed"), "service_not_allowed in /status")
    refusal = plane.refusals("service_not_allowed")[-1]
    assert (refusal["identity"], refusal["service"]) == (ORDERS_ID, "billing")
    until(lambda: "service_not_allowed" in (readyz(thief)[1]["control_plane"]["connection_error"] or ""),
          "the agent shows the refusal")  # fmt: skip
    code, body = readyz(thief)
    assert code == 503 and body["control_plane"]["version"] is None  # no bundle reached it
    assert not (plane.work / "agent-thief" / "state" / "last-good.msgpack").exists()
    assert not plane.connected("billing") or all(a["identity"] != ORDERS_ID for a in plane.connected("billing"))
    # The log says it once, not at every reconnect.
    assert (plane.work / "agent-thief" / "agent.stderr").read_text().count("service_not_allowed") == 1


def test_a_status_report_lands_only_on_its_own_service(plane: Plane) -> None:
    plane.agent("billing", "billing", "billing")
    billing = plane.connected("billing")[0]
    # The orders identity names the billing agent's id and reports a version it does not hold.
    hold = threading.Event()
    forged = [pb.AgentMessage(hello=pb.Hello(service="orders", agent_id=billing["agent_id"])),
              pb.AgentMessage(status=pb.Status(version="forged"))]  # fmt: skip
    channel, _ = raw_sync(plane, "orders", forged, hold)
    try:
        until(lambda: any(a["version"] == "forged" for a in plane.connected("orders")), "the forged report landed")
        mine = [a for a in plane.cp.status()["agents"] if a["agent_id"] == billing["agent_id"]]
        by_service = {a["service"]: a for a in mine}
        assert by_service["billing"]["version"] == billing["version"] and by_service["billing"]["connected"]
        assert by_service["orders"]["identity"] == ORDERS_ID  # it landed on orders, the only service it may report
        # And asking for billing with that certificate is refused before anything is read or sent.
        refused_before = plane.cp.status()["refusals"]["counts"].get("service_not_allowed", 0)
        hold2 = threading.Event()
        ch2, call2 = raw_sync(plane, "orders", [pb.AgentMessage(hello=pb.Hello(service="billing"))], hold2)
        with pytest.raises(grpc.RpcError) as e:
            next(iter(call2))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        hold2.set()
        ch2.close()
        assert plane.cp.status()["refusals"]["counts"]["service_not_allowed"] == refused_before + 1
    finally:
        hold.set()
        channel.close()


def test_an_agents_rotated_certificate_is_used_without_a_restart(plane: Plane) -> None:
    until(lambda: plane.connected("orders"), "orders agent connected")
    [old] = [a for a in plane.connected("orders") if a["version"] != "forged"]
    new = plane.pki.leaf("orders", ORDERS_ID)  # same identity, new key and serial, written over the agent's files
    assert new.fingerprint != old["cert_fingerprint"]
    until(lambda: [a["cert_fingerprint"] for a in plane.connected("orders")] == [new.fingerprint],
          "the control plane sees the agent's new certificate")  # fmt: skip
    agent = next(a for a in plane.agents if "agent-orders" in str(a.stderr_path))
    assert readyz(agent)[1]["control_plane"]["tls"]["certificate"]["fingerprint"] == new.fingerprint
    assert agent.proc.poll() is None  # the same process


def test_the_control_planes_rotated_certificate_is_served_to_new_connections(plane: Plane) -> None:
    before = served_fingerprint(plane.cp.port, plane.pki)
    assert before == plane.cp.status()["channel"]["tls"]["certificate"]["fingerprint"]
    new = plane.pki.leaf("server", "127.0.0.1", "localhost")
    until(lambda: served_fingerprint(plane.cp.port, plane.pki) == new.fingerprint, "new server certificate served")
    admin_port = int(plane.cp.admin.rpartition(":")[2])
    assert served_fingerprint(admin_port, plane.pki) == new.fingerprint
    plane.agent("orders-2", "orders", "orders")  # a new agent verifies the new certificate and fetches
    # A key that does not match the certificate (a half-done deploy) is refused; the new certificate stays.
    cert, key = plane.pki.paths("server")
    tmp = key.with_name("server.key.tmp")
    tmp.write_bytes(plane.pki.paths("admin")[1].read_bytes())
    tmp.replace(key)
    until(lambda: plane.cp.status()["channel"]["tls"]["error"], "a mismatched key is refused")
    assert "not a usable certificate and key pair" in plane.cp.status()["channel"]["tls"]["error"]
    assert served_fingerprint(plane.cp.port, plane.pki) == new.fingerprint
    new.write(cert, key)
    until(lambda: plane.cp.status()["channel"]["tls"]["error"] is None, "the fixed pair is taken")


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux) for a low fd limit")
def test_idle_connections_cannot_starve_the_control_plane(plane: Plane, tmp_path: Path) -> None:
    """400 idle TCP connects to the sync port from 10 loopback hosts, against a control plane limited to 256 file
    descriptors: the caps refuse what is over them at once (too_many_connections), nothing runs into EMFILE, an
    admin's /status keeps answering within its deadline, and the log stays a few lines."""
    cp = ControlPlaneProcess(plane.policies, plane.key, tmp_path, pki=plane.pki,
                             prefix=("prlimit", "--nofile=256:256", "--"))  # fmt: skip
    idle: list[socket.socket] = []
    try:
        limits = cp.status()["channel"]["fronts"]["sync"]["limits"]
        # A handshake holds one descriptor, a forwarded connection three: both fronts at their caps fit in 256.
        assert limits["handshakes"] + 3 * limits["connections"] <= (256 - 64) // 2
        for i in range(400):
            s = socket.socket()
            idle.append(s)
            s.bind((f"127.0.0.{2 + i % 10}", 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", cp.port))
        until(lambda: cp.status()["refusals"]["counts"].get("too_many_connections", 0) >= 400 - limits["handshakes"],
              "the connects over the cap refused")  # fmt: skip
        for _ in range(5):  # the flood still held open: the admin port answers, each within its 2 s deadline
            status = cp.status()
            assert status["channel"]["fronts"]["sync"]["handshakes"] <= limits["handshakes"]
        refused = [r for r in status["refusals"]["last"] if r["reason"] == "too_many_connections"]
        assert refused and "TLS handshakes in progress" in refused[-1]["detail"]
        # The idle ones are dropped after the handshake timeout; a real agent then gets in.
        until(lambda: cp.status()["channel"]["fronts"]["sync"]["handshakes"] == 0, "idle handshakes timed out")
        args = ["--control-plane", f"127.0.0.1:{cp.port}", "--service", "orders", "--state-dir",
                str(tmp_path / "state"), "--bundle-key", str(plane.verify),
                *plane.pki.agent_args("orders")]  # fmt: skip
        agent = AgentProcess(args, f"127.0.0.1:{free_port()}", tmp_path, "grpcio")  # ready: it fetched its bundle
        agent.stop()
        log = cp.log_path.read_text()
        assert "accepting on the sync port failed" not in log  # the caps, not EMFILE, refused them
        assert log.count("too_many_connections") <= 10  # one line per source host and minute
        assert len(log.splitlines()) < 60
    finally:
        for s in idle:
            s.close()
        cp.stop()


def test_admin_port_needs_an_admin_certificate(plane: Plane) -> None:
    assert plane.cp.get("/status", "admin")[0] == 200
    code, body = plane.cp.get("/status", "orders")
    assert code == 403 and "admin" in body["error"]
    refusal = [r for r in plane.refusals("not_admin") if r["port"] == "admin"][-1]
    assert refusal["identity"] == ORDERS_ID
    before = plane.cp.status()["refusals"]["counts"].get("no_certificate", 0)
    with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
        plane.cp.get("/status", None)
    until(lambda: plane.cp.status()["refusals"]["counts"]["no_certificate"] == before + 1, "no_certificate counted")
    assert plane.refusals("no_certificate")[-1]["port"] == "admin"
    with pytest.raises((ConnectionError, urllib.error.URLError, http_errors())):
        urllib.request.urlopen(f"http://{plane.cp.admin}/status", timeout=2)  # plain HTTP: no answer at all


def http_errors() -> type[Exception]:
    import http.client

    return http.client.HTTPException


def test_agents_yaml_edits_end_open_streams_and_a_bad_edit_changes_nothing(plane: Plane) -> None:
    until(lambda: plane.connected("orders"), "orders agents connected")
    # A broken edit: refused with file:line, the previous mapping stays (the agents stay connected).
    plane.pki.agents.write_text(AGENTS_YAML.replace("admins:", "  - identity: spiffe://x\n    servics: [y]\nadmins:"))
    until(lambda: plane.cp.status()["channel"]["agents_file"]["error"], "a broken is refused")
    error = plane.cp.status()["channel"]["agents_file"]["error"]
    assert f"{plane.pki.agents}:7: agents[2]: unknown key 'servics'" in error and "previous mapping stays" in error
    assert plane.connected("orders")
    # orders removed: its open streams are ended and the next ones refused.
    ended_before = len([r for r in plane.refusals("identity_unknown") if "open stream ended" in r["detail"]])
    plane.pki.agents.write_text(AGENTS_YAML.replace(f"  - identity: {ORDERS_ID}\n    services: [orders]\n", ""))
    until(lambda: not [a for a in plane.connected("orders") if a["identity"] == ORDERS_ID], "orders streams ended")
    ended = [r for r in plane.refusals("identity_unknown") if "open stream ended" in r["detail"]]
    assert len(ended) > ended_before and ended[-1]["service"] == "orders"
    until(lambda: [r for r in plane.refusals("identity_unknown")
                   if r["identity"] == ORDERS_ID and "open stream ended" not in r["detail"]],
          "the reconnect is refused")  # fmt: skip
    assert plane.cp.status()["channel"]["agents_file"]["error"] is None
    plane.pki.agents.write_text(AGENTS_YAML)
    until(lambda: len(plane.connected("orders")) >= 2, "orders agents back once allowed again", timeout=30)


def test_a_bad_agents_yaml_at_start_refuses_to_start(plane: Plane, tmp_path: Path) -> None:
    bad = tmp_path / "agents.yaml"
    bad.write_text(f"agents:\n  - identity: {ORDERS_ID}\n    services: [orders]\n  - identity: {ORDERS_ID}\n"
                   "    services: [billing]\n")  # fmt: skip
    args = [sys.executable, "-m", "agent", "control-plane", "--policies", str(plane.policies), "--signing-key",
            str(plane.key), "--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}",
            *plane.pki.server_args()]  # fmt: skip
    args[args.index(str(plane.pki.agents))] = str(bad)
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert f"{bad}:4: agents[1]: identity {ORDERS_ID!r} is listed twice (first at line 2)" in r.stderr


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=30)


def test_insecure_only_on_loopback_and_never_with_tls_flags(plane: Plane, tmp_path: Path) -> None:
    base = ["control-plane", "--policies", str(plane.policies), "--signing-key", str(plane.key)]
    r = cli(*base, "--listen", f"127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "--tls-cert, --tls-key, --client-ca, --agents" in r.stderr
    r = cli(*base, "--insecure", "--listen", f"0.0.0.0:{free_port()}")
    assert r.returncode == 2 and "only on loopback" in r.stderr and "0.0.0.0" in r.stderr
    r = cli(*base, "--insecure", "--admin", f"0.0.0.0:{free_port()}")
    assert r.returncode == 2 and "only on loopback" in r.stderr
    r = cli(*base, "--insecure", *plane.pki.server_args())
    assert r.returncode == 2 and "contradicts" in r.stderr
    run = ["run", "--service", "orders", "--state-dir", str(tmp_path / "s"), "--bundle-key", str(plane.verify)]
    r = cli(*run, "--control-plane", "127.0.0.1:9")
    assert r.returncode == 2 and "--control-plane-ca, --tls-cert, --tls-key" in r.stderr
    r = cli(*run, "--control-plane", "10.1.2.3:9300", "--insecure")
    assert r.returncode == 2 and "loopback" in r.stderr
    r = cli(*run, "--control-plane", "127.0.0.1:9", "--insecure", *plane.pki.agent_args("orders"))
    assert r.returncode == 2 and "contradicts" in r.stderr
    # On loopback it works: a plain-text control plane and agent.
    cp = ControlPlaneProcess(plane.policies, plane.key, tmp_path)
    try:
        assert cp.status()["channel"] == {"insecure": True}
        args = ["--control-plane", f"127.0.0.1:{cp.port}", "--service", "orders", "--state-dir", str(tmp_path / "s"),
                "--bundle-key", str(plane.verify), "--insecure"]  # fmt: skip
        agent = AgentProcess(args, f"127.0.0.1:{free_port()}", tmp_path, "grpcio")
        try:
            until(lambda: cp.status()["services"]["orders"]["agents_on_version"] == 1, "plain-text agent on version")
        finally:
            agent.stop()
    finally:
        cp.stop()


def test_no_key_material_in_any_log_or_status(plane: Plane) -> None:
    secrets = plane.pki.key_material()
    assert secrets
    outputs = [plane.cp.log_path.read_text(), json.dumps(plane.cp.status())]
    outputs += [a.stderr_path.read_text() for a in plane.agents]
    outputs += [json.dumps(readyz(a)[1]) for a in plane.agents if a.proc.poll() is None]
    for out in outputs:
        assert "PRIVATE KEY" not in out and "BEGIN CERTIFICATE" not in out
        for line in secrets:
            assert line not in out
