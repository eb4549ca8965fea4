"""The console on a TLS control plane: the admin port then takes browsers without a client certificate, and that
must open nothing else. /status still refuses a peer without an admin certificate (no_certificate, counted and
listed as before, the connection closed), a non-admin certificate (not_admin), a certificate of another CA at the
handshake (certificate_invalid); the sync port still requires a certificate; /ui over TLS logs in through the
IdP with Secure cookies; someone on this host reaching the internal admin port directly gets no console."""

from __future__ import annotations

import asyncio
import socket
import ssl
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.controlplane.console import ConsoleConfig
from agent.controlplane.server import ControlPlane
from agent.controlplane.tls import ServerChannel, ServerTlsFiles
from agent.demo.idp import LocalIdP
from tests.certs import ORDERS_ID, Pki, issue
from tests.console_http import console_client, http_login
from tests.wait import until_async

POLICY = textwrap.dedent("""\
    version: 1
    service: orders
    routes:
      - {name: health, match: {path: /healthz}, public: true}
    """)
CLIENT_ID = "authz-console"


class Plane:
    def __init__(self, cp: ControlPlane, pki: Pki, idp: LocalIdP, passwords: dict[str, str]) -> None:
        self.cp, self.pki, self.idp, self.passwords = cp, pki, idp, passwords
        self.base = f"https://127.0.0.1:{cp.admin_port}"

    def count(self, reason: str) -> int:
        return int(self.cp.status()["refusals"]["counts"].get(reason, 0))

    def last(self, reason: str) -> dict[str, Any]:
        return [r for r in self.cp.status()["refusals"]["last"] if r["reason"] == reason][-1]


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    pki = Pki(tmp_path)
    pki.leaf("orders", ORDERS_ID)
    idp = LocalIdP()
    await idp.start()
    passwords = idp.demo_users()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "orders.yaml").write_text(POLICY)
    cert, key = pki.paths("server")
    channel = ServerChannel(ServerTlsFiles(cert, key, pki.ca_path, pki.agents), admin_cert_optional=True)
    console = ConsoleConfig(idp.issuer, CLIENT_ID)
    cp = ControlPlane(policies, Ed25519PrivateKey.generate(), "127.0.0.1:0", "127.0.0.1:0", channel=channel,
                      console=console)  # fmt: skip
    await cp.start()
    idp.register_client(CLIENT_ID, [f"https://127.0.0.1:{cp.admin_port}/ui/callback"])
    try:
        yield Plane(cp, pki, idp, passwords)
    finally:
        await cp.stop()
        await idp.stop()


async def _get(plane: Plane, path: str, cert: str | None, refused: bool = False) -> tuple[int, dict[str, str], str]:
    """GET over TLS with `cert`'s client certificate (or none): status, headers, body. `refused`: the server must
    close the connection after its answer (a refused peer cannot hold the admin port open)."""
    ctx = plane.pki.client_context(cert)
    reader, writer = await asyncio.open_connection("127.0.0.1", plane.cp.admin_port, ssl=ctx,
                                                   server_hostname="127.0.0.1")  # fmt: skip
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
        lines = head.split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
        if refused:
            assert await asyncio.wait_for(reader.read(1), 10) == b"", "the connection was left open"
        return int(lines[0].split()[1]), headers, body.decode()
    finally:
        writer.close()


async def test_status_without_a_certificate_is_refused_as_before(plane: Plane) -> None:
    before = plane.count("no_certificate")
    status, _, body = await _get(plane, "/status", None, refused=True)
    assert status == 403 and "client certificate" in body
    assert plane.count("no_certificate") == before + 1
    refusal = plane.last("no_certificate")
    assert refusal["port"] == "admin" and refusal["identity"] is None
    assert "services" not in body and "refusals" not in body
    # An admin's certificate still reads it; an agent's is not an admin.
    status, _, body = await _get(plane, "/status", "admin")
    assert status == 200 and '"services"' in body
    before = plane.count("not_admin")
    status, _, body = await _get(plane, "/status", "orders", refused=True)
    assert status == 403 and plane.count("not_admin") == before + 1


async def test_status_cannot_be_reached_without_a_certificate_by_another_spelling(plane: Plane) -> None:
    """With the console on, the admin port takes peers without a certificate (browsers): no spelling of the status
    path reaches the status without an admin certificate."""
    for path in ("/status/", "//status", "/ui/../status", "/ui/%2e%2e/status", "/%73tatus", "/status?x=1",
                 "/status%00", "/STATUS", "/ui/status", "/./status"):  # fmt: skip
        status, _, body = await _get(plane, path, None)
        assert '"services"' not in body and '"refusals"' not in body, (path, status)
        assert status in (403, 404, 400, 302), (path, status)


async def test_a_certificate_of_another_ca_is_still_refused_at_the_handshake(plane: Plane, tmp_path: Path) -> None:
    other = trustme.CA()
    issue(other, "spiffe://example.org/admin").write(tmp_path / "x.pem", tmp_path / "x.key")
    ctx = plane.pki.client_context(None)
    ctx.load_cert_chain(tmp_path / "x.pem", tmp_path / "x.key")
    before = plane.count("certificate_invalid")
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        reader, writer = await asyncio.open_connection("127.0.0.1", plane.cp.admin_port, ssl=ctx,
                                                       server_hostname="127.0.0.1")  # fmt: skip
        writer.write(b"GET /ui/login HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    await until_async(lambda: plane.count("certificate_invalid") == before + 1, "certificate_invalid counted")


async def test_the_sync_port_still_requires_a_certificate(plane: Plane) -> None:
    before = plane.count("no_certificate")
    ctx = plane.pki.client_context(None)
    ctx.set_alpn_protocols(["h2"])
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        reader, writer = await asyncio.open_connection("127.0.0.1", plane.cp.port, ssl=ctx,
                                                       server_hostname="127.0.0.1")  # fmt: skip
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(1), 10) == b""
        raise ConnectionError("closed")
    await until_async(lambda: plane.count("no_certificate") == before + 1, "no_certificate counted")
    assert plane.last("no_certificate")["port"] == "sync"


async def test_a_browser_without_a_certificate_signs_in_over_tls_with_secure_cookies(plane: Plane) -> None:
    status, headers, _ = await _get(plane, "/ui/", None)
    assert status == 302 and headers["location"] == "/ui/login/start"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    async with console_client(plane.pki.client_context(None)) as http:
        async with http.get(plane.base + "/ui/login/start", allow_redirects=False) as r:
            login_cookie = r.headers["Set-Cookie"]
        assert "Secure" in login_cookie and "HttpOnly" in login_cookie and "SameSite=Lax" in login_cookie
        http.cookie_jar.clear()
        csrf = await http_login(http, plane.base, plane.idp, "ada", plane.passwords["ada"])
        cookies = {c.key: c for c in http.cookie_jar}
        # __Host-: Secure, Path=/, no Domain, so a sibling subdomain cannot plant one (login fixation)
        assert "authz_console" not in cookies
        session = cookies["__Host-authz_console"]
        assert session["secure"] and session["httponly"] and session["samesite"] == "Strict"
        assert session["path"] == "/"
        async with http.get(plane.base + "/ui/", allow_redirects=False) as r:
            assert r.status == 200 and "Ada Lovelace" in await r.text()
        # /status is not opened by a console session.
        async with http.get(plane.base + "/status", allow_redirects=False) as r:
            assert r.status == 403
        async with http.post(plane.base + "/ui/logout", data={"csrf": csrf}, allow_redirects=False,
                             headers={"Origin": plane.base}) as r:  # fmt: skip
            assert r.status == 303


def _raw_get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


async def test_the_internal_admin_port_gives_no_console(plane: Plane) -> None:
    """Someone on this host connecting to the internal (plain) admin port is not a TLS peer: no console."""
    front = plane.cp._admin_front
    assert front is not None
    for path in ("/ui/", "/ui/login/start", "/ui/login"):
        answer = await asyncio.to_thread(_raw_get, front._internal, path)
        assert answer.split(b"\r\n")[0].split()[1] == b"403", (path, answer[:200])


async def test_peers_without_a_certificate_are_capped_per_source_host(plane: Plane) -> None:
    """Browsers share no identity: each source host has its own cap, so one host cannot fill every console seat."""
    front = plane.cp._admin_front
    assert front is not None
    ctx = plane.pki.client_context(None)
    writers = []
    try:
        for _ in range(3):
            _, w = await asyncio.open_connection("127.0.0.1", plane.cp.admin_port, ssl=ctx,
                                                 server_hostname="127.0.0.1")  # fmt: skip
            writers.append(w)
        await until_async(lambda: front._identities.get("no certificate from 127.0.0.1") == 3, "3 counted")
    finally:
        for w in writers:
            w.close()


async def test_without_the_console_a_peer_without_a_certificate_is_refused_at_the_handshake(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "orders.yaml").write_text(POLICY)
    cert, key = pki.paths("server")
    channel = ServerChannel(ServerTlsFiles(cert, key, pki.ca_path, pki.agents))
    cp = ControlPlane(policies, Ed25519PrivateKey.generate(), "127.0.0.1:0", "127.0.0.1:0", channel=channel)
    await cp.start()
    try:
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            reader, writer = await asyncio.open_connection("127.0.0.1", cp.admin_port, ssl=pki.client_context(None),
                                                           server_hostname="127.0.0.1")  # fmt: skip
            writer.write(b"GET /ui/ HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        await until_async(lambda: cp.status()["refusals"]["counts"].get("no_certificate") == 1, "counted")
    finally:
        await cp.stop()
