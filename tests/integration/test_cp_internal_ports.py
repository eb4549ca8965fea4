"""The TLS front's internal loopback ports, reached directly by someone on the host: never a verified peer.

The front maps a forwarding connection's local port to its verified peer. A local process that binds another
loopback address (127.0.0.2) to that same port number and connects to the internal port must not be taken for
that peer: the port number alone is not the forwarding connection."""

from __future__ import annotations

import asyncio
import json
import socket
import textwrap
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.controlplane.server import ControlPlane
from agent.controlplane.tls import ServerChannel, ServerTlsFiles
from tests.certs import Pki
from tests.wait import until_async

POLICY = textwrap.dedent("""\
    version: 1
    service: orders
    routes:
      - {name: health, match: {path: /healthz}, public: true}
    """)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_status_from(source: tuple[str, int], port: int) -> bytes:
    """GET /status on the internal admin port, from `source` (a plain socket: what a local attacker has)."""
    with socket.socket() as s:
        s.settimeout(5)
        s.bind(source)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


async def test_a_local_process_reusing_an_admins_forwarding_port_number_is_refused(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "orders.yaml").write_text(POLICY)
    cert, key = pki.paths("server")
    channel = ServerChannel(ServerTlsFiles(cert, key, pki.ca_path, pki.agents))
    admin = f"127.0.0.1:{_free_port()}"
    cp = ControlPlane(policies, Ed25519PrivateKey.generate(), f"127.0.0.1:{_free_port()}", admin, channel=channel)
    await cp.start()
    try:
        front = cp._admin_front
        assert front is not None
        # An admin's keep-alive connection through the front (a dashboard polling /status).
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", cp.admin_port, ssl=pki.client_context("admin"), server_hostname="127.0.0.1"
        )
        writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        assert b" 200 " in await reader.readline()
        await until_async(lambda: bool(front._peers), "the forwarding connection mapped")
        # What `ss -tn` shows any local user: 127.0.0.1:<forwarding port> -> 127.0.0.1:<internal port>.
        forwarding_port = next(iter(front._peers))
        internal_port = front._internal
        answer = await asyncio.to_thread(_get_status_from, ("127.0.0.2", forwarding_port), internal_port)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b" 403 " in head.split(b"\r\n")[0], head.split(b"\r\n")[0]
        assert "refusals" not in json.loads(body or b"{}")
        writer.close()
    finally:
        await cp.stop()
