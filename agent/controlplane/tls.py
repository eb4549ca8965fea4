"""The control-plane channel's TLS: contexts, the TLS front both ports sit behind, refusals, and file rotation.

grpcio's own server TLS refuses a peer without a valid certificate inside its handshake, where Python never
hears of it; the issue wants every refusal counted and shown. So the control plane terminates TLS itself
(Python's ssl, TLS 1.3 only, client certificates required and verified against --client-ca) and forwards each
verified connection to the gRPC (or admin HTTP) server on an internal loopback port. The forwarding connection's
local port maps to the verified peer; a handler looks its caller up there, and a caller not found (someone on
this host connecting to the internal port directly) is refused.

Certificates, keys and agents.yaml are re-read when they change (stat first, then the content compared): new
connections take the new ones; a bad new file is refused (logged, in /status) and the previous one stays.
Nothing here ever logs or shows a certificate's PEM or a key.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import socket
import ssl
import stat
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from agent.controlplane.agents import AgentsFile, PeerIdentity, load_agents
from agent.errors import ConfigError

log = logging.getLogger("agent.controlplane")

HANDSHAKE_TIMEOUT_S = 10.0  # a peer that opens a connection and says nothing is dropped after this
MAX_PEM_BYTES = 1 << 20  # a certificate chain, key or CA bundle larger than this is refused, not read
REFUSALS_KEPT = 50  # the last refusals /status lists (each reason is counted without bound)
REFUSAL_LOG_S = 60.0  # one log line per (reason, peer host) in this time; the rest are counted, then summed up
REFUSAL_LOG_KEYS = 4096  # (reason, peer host) pairs remembered for that; the oldest out first
CLIENT_POLL_S = 1.0  # how often an agent looks at its certificate files
PIPE_CHUNK = 1 << 16

# Refusal reasons, as /status and the log name them.
NO_CERTIFICATE = "no_certificate"
CERTIFICATE_INVALID = "certificate_invalid"
IDENTITY_UNKNOWN = "identity_unknown"
SERVICE_NOT_ALLOWED = "service_not_allowed"
NOT_ADMIN = "not_admin"
HANDSHAKE_FAILED = "handshake_failed"  # not TLS, an older TLS version, a timeout: no certificate was looked at


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: where plain text (--insecure) is allowed."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(address: str) -> str:
    """HOST of HOST:PORT (brackets of an IPv6 address removed)."""
    return address.rpartition(":")[0].strip("[]")


def read_pem(path: Path, what: str) -> bytes:
    """A PEM file's bytes, bounded; ValueError naming the file (never its content)."""
    try:
        with path.open("rb") as f:
            if not stat.S_ISREG(path.stat().st_mode):
                raise ValueError("not a regular file")
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the {what}: {e.strerror}") from None
    if len(data) > MAX_PEM_BYTES:
        raise ValueError(f"{path}: the {what} is larger than {MAX_PEM_BYTES} bytes")
    if b"-----BEGIN " not in data:
        raise ValueError(f"{path}: the {what} is not PEM")
    return data


def server_context(
    cert: Path, key: Path, client_ca: Path, *, alpn: list[str], require_client_cert: bool = True
) -> ssl.SSLContext:
    """The one place the control plane's server TLS is set up (both ports): TLS 1.3 only, this certificate, and
    client certificates verified against `client_ca`. `require_client_cert=False` (a later console path behind
    an OIDC login) still verifies a certificate that is sent; the handler then decides per path."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"{cert}, {key}: not a usable certificate and key pair ({_ssl_reason(e)})") from None
    ca_pem = read_pem(client_ca, "client CA")
    try:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
    except ssl.SSLError as e:
        raise ValueError(f"{client_ca}: no usable CA ({_ssl_reason(e)})") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(alpn)
    return ctx


def check_client_files(ca: Path, cert: Path, key: Path) -> tuple[bytes, bytes, bytes]:
    """The agent's CA, certificate and key, checked to load together (a pair half replaced is refused)."""
    ca_pem, cert_pem, key_pem = read_pem(ca, "control-plane CA"), read_pem(cert, "certificate"), read_pem(key, "key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
    except ssl.SSLError as e:
        raise ValueError(f"{ca}: no usable CA ({_ssl_reason(e)})") from None
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"{cert}, {key}: not a usable certificate and key pair ({_ssl_reason(e)})") from None
    return ca_pem, cert_pem, key_pem


def _ssl_reason(e: BaseException) -> str:
    """An ssl error's reason code, never more (it cannot carry file content, but keep it short)."""
    return str(getattr(e, "reason", None) or getattr(e, "strerror", None) or type(e).__name__)


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def cert_summary(pem: bytes) -> dict[str, Any]:
    """What /status may show of a certificate: fingerprint, serial, names, validity; never the PEM."""
    cert = x509.load_pem_x509_certificate(pem)
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in sans.get_values_for_type(x509.UniformResourceIdentifier)]
        names += [str(v) for v in sans.get_values_for_type(x509.DNSName)]
        names += [str(v) for v in sans.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    return {
        "fingerprint": fingerprint(cert.public_bytes(Encoding.DER)),
        "serial": format(cert.serial_number, "X"),
        "names": names,
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def peer_identity(ssl_object: ssl.SSLObject) -> PeerIdentity:
    """The verified peer's URI and DNS SANs, serial and fingerprint."""
    info = ssl_object.getpeercert() or {}
    sans: tuple[tuple[str, str], ...] = tuple(info.get("subjectAltName", ()))  # type: ignore[arg-type]
    der = ssl_object.getpeercert(binary_form=True) or b""
    return PeerIdentity(
        uris=tuple(str(v) for k, v in sans if k == "URI"),
        dns=tuple(str(v) for k, v in sans if k == "DNS"),
        serial=str(info.get("serialNumber", "")),
        fingerprint=fingerprint(der) if der else "",
    )


def handshake_refusal(e: BaseException) -> tuple[str, str]:
    """(reason, detail) of a failed server-side handshake."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return CERTIFICATE_INVALID, f"certificate verify failed: {e.verify_message}"
    reason = getattr(e, "reason", None)
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return NO_CERTIFICATE, "the peer sent no client certificate"
    if isinstance(e, (TimeoutError, ConnectionAbortedError)):  # asyncio's ssl_handshake_timeout aborts
        return HANDSHAKE_FAILED, f"no TLS handshake within {HANDSHAKE_TIMEOUT_S:g} s"
    if isinstance(e, ssl.SSLError) and reason:
        return HANDSHAKE_FAILED, f"TLS handshake failed: {reason}"
    return HANDSHAKE_FAILED, f"TLS handshake failed: {type(e).__name__}"


class Refusals:
    """Every refusal: counted by reason, the last REFUSALS_KEPT kept for /status, each one logged."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.last: deque[dict[str, Any]] = deque(maxlen=REFUSALS_KEPT)
        # (reason, peer host) -> [when last logged, refusals since, not logged]: a port scan, a TCP health probe or
        # a refused agent retrying cannot flood the log, and every refusal is still counted and listed.
        self._logged: dict[tuple[str, str], list[float]] = {}

    def add(self, reason: str, peer: str, identity: str | None, service: str | None, detail: str, port: str) -> None:
        service = None if service is None else _printable(service)  # from the peer's first message: any text
        self.counts[reason] += 1
        now = time.monotonic()
        self.last.append({"time": time.time(), "port": port, "peer": peer, "identity": identity,
                          "service": service, "reason": reason, "detail": detail})  # fmt: skip
        key = (reason, peer.rsplit(":", 1)[0])
        seen = self._logged.get(key)
        if seen is not None and now - seen[0] < REFUSAL_LOG_S:
            seen[1] += 1
            return
        more = f" ({int(seen[1])} more from there in the last minute, not logged)" if seen and seen[1] else ""
        if seen is None and len(self._logged) >= REFUSAL_LOG_KEYS:
            del self._logged[next(iter(self._logged))]
        self._logged[key] = [now, 0.0]
        log.warning("refused %s on the %s port (identity %s, service %s): %s: %s%s",
                    peer, port, identity, service, reason, detail, more)  # fmt: skip

    def status(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "last": list(self.last)}


@dataclass(frozen=True)
class ClientTlsFiles:
    """The agent's side: the CA the control plane's certificate must chain to, and its own certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def stamps(self) -> tuple[object, ...]:
        return tuple(_stamp(p) for p in (self.ca, self.cert, self.key))


@dataclass(frozen=True)
class ServerTlsFiles:
    cert: Path
    key: Path
    client_ca: Path
    agents: Path


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ServerChannel:
    """The control plane's TLS contexts and agents.yaml, as last read successfully; `poll()` takes changes.

    Constructing it reads everything and raises ValueError (a ConfigError at file:line for agents.yaml): the
    control plane refuses to start on a bad file."""

    def __init__(self, files: ServerTlsFiles) -> None:
        self.files = files
        self.refusals = Refusals()
        self.tls_error: str | None = None
        self.agents_error: str | None = None
        self._tls_stamps = self._stamps_tls()
        self._tls_seen = self._read_tls()
        self.grpc_context, self.admin_context, self.cert = self._contexts()
        self._agents_stamp = _stamp(files.agents)
        self._agents_seen = self._read_agents_bytes()
        self.agents: AgentsFile = load_agents(files.agents)
        self.reloaded_at = time.time()

    def _stamps_tls(self) -> tuple[object, ...]:
        return tuple(_stamp(p) for p in (self.files.cert, self.files.key, self.files.client_ca))

    def _read_tls(self) -> tuple[bytes, ...]:
        names = ((self.files.cert, "certificate"), (self.files.key, "key"), (self.files.client_ca, "client CA"))
        return tuple(read_pem(p, what) for p, what in names)

    def _read_agents_bytes(self) -> bytes:
        try:
            return self.files.agents.read_bytes()[: 8 << 20]
        except OSError:
            return b""

    def _contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext, dict[str, Any]]:
        f = self.files
        grpc_ctx = server_context(f.cert, f.key, f.client_ca, alpn=["h2"])
        admin_ctx = server_context(f.cert, f.key, f.client_ca, alpn=["http/1.1"])
        try:
            summary = cert_summary(self._tls_seen[0])
        except ValueError as e:
            raise ValueError(f"{f.cert}: not a certificate ({type(e).__name__})") from None
        return grpc_ctx, admin_ctx, summary

    def poll(self) -> bool:
        """Take changed files; True when the agents mapping changed (open streams must be checked again)."""
        stamps = self._stamps_tls()
        if stamps != self._tls_stamps:
            self._tls_stamps = stamps
            self._reload_tls()
        stamp = _stamp(self.files.agents)
        if stamp == self._agents_stamp:
            return False
        self._agents_stamp = stamp
        data = self._read_agents_bytes()
        if data == self._agents_seen:
            return False
        self._agents_seen = data
        try:
            agents = load_agents(self.files.agents)
        except ConfigError as e:
            self.agents_error = f"{e}; the previous mapping stays"
            log.error("agents file refused: %s", self.agents_error)
            return False
        self.agents_error = None
        if agents == self.agents:
            return False
        self.agents = agents
        log.info("agents file %s reloaded: %d identities, %d admins", self.files.agents, len(agents.services),
                 len(agents.admins))  # fmt: skip
        return True

    def _reload_tls(self) -> None:
        try:
            seen = self._read_tls()
        except ValueError as e:
            self._refuse_tls(str(e))
            return
        if seen == self._tls_seen:
            return
        previous = self._tls_seen
        self._tls_seen = seen
        try:
            self.grpc_context, self.admin_context, self.cert = self._contexts()
        except ValueError as e:
            self._refuse_tls(str(e))  # _tls_seen keeps it: the same bad content is not tried again every poll
            return
        self.tls_error = None
        self.reloaded_at = time.time()
        what = [name for name, a, b in zip(("certificate", "key", "client CA"), previous, seen, strict=True) if a != b]
        log.info("TLS reloaded (%s changed): new connections use certificate %s", ", ".join(what),
                 self.cert["fingerprint"])  # fmt: skip

    def _refuse_tls(self, error: str) -> None:
        self.tls_error = f"{error}; the previous certificate stays"
        log.error("TLS files refused: %s", self.tls_error)

    def status(self) -> dict[str, Any]:
        return {
            "tls": {
                "certificate": self.cert,
                "error": self.tls_error,
                "min_version": "TLSv1.3",
                "client_ca": str(self.files.client_ca),
                "reloaded_at": self.reloaded_at,
            },
            "agents_file": {
                "path": str(self.files.agents),
                "identities": len(self.agents.services),
                "admins": len(self.agents.admins),
                "error": self.agents_error,
            },
        }


@dataclass(frozen=True)
class Forwarded:
    """A connection that passed the TLS front: who it is and where it came from."""

    identity: PeerIdentity
    address: str


class TlsFront:
    """TLS terminated here, every handshake refusal counted, each verified connection forwarded to `internal`."""

    def __init__(self, listen: str, context: Callable[[], ssl.SSLContext], refusals: Refusals, port_name: str) -> None:
        self.listen = listen
        self._context = context
        self._refusals = refusals
        self.port_name = port_name  # "sync" or "admin", in refusals
        self.port = 0
        self._internal = 0
        self._sock: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._peers: dict[int, Forwarded] = {}  # the forwarding connection's local port -> its peer

    async def start(self, internal_port: int) -> None:
        self._internal = internal_port
        host, _, port = self.listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        family, _, _, _, address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
        sock = socket.create_server(address[:2], family=family, backlog=1024)
        sock.setblocking(False)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._acceptor = asyncio.get_running_loop().create_task(self._accept_loop(sock))

    async def _accept_loop(self, sock: socket.socket) -> None:
        """Accept plain sockets and do each handshake ourselves: asyncio's streams would read a ClientHello into
        their buffer before a start_tls, and asyncio's TLS server hides a refused handshake from its caller."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as e:  # EMFILE and the like: wait a little rather than spin
                log.error("accepting on the %s port failed: %s", self.port_name, e)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._serve(conn, peer))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    def peer_of(self, internal_peer: tuple[str, int] | str | None) -> Forwarded | None:
        """The verified peer behind a connection to the internal port (grpc's `context.peer()`, or aiohttp's
        peername); None for anyone who connected to it directly."""
        if isinstance(internal_peer, tuple):
            # The address too: a local process can bind 127.0.0.2 to a forwarding connection's port number.
            if internal_peer[0] != "127.0.0.1":
                return None
            port = internal_peer[1]
        elif isinstance(internal_peer, str) and internal_peer.startswith("ipv4:127.0.0.1:"):
            port = int(internal_peer.rpartition(":")[2])
        else:
            return None
        return self._peers.get(port)

    def refuse(self, reason: str, peer: str, identity: str | None, service: str | None, detail: str) -> None:
        self._refusals.add(reason, peer, identity, service, detail, self.port_name)

    async def _serve(self, conn: socket.socket, peer: Any) -> None:
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=PIPE_CHUNK)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self._context(), ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S
            )
        except (ssl.SSLError, OSError, TimeoutError, EOFError) as e:
            reason, detail = handshake_refusal(e)
            self.refuse(reason, address, None, None, detail)
            conn.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        identity = peer_identity(writer.get_extra_info("ssl_object"))
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._internal)
        except OSError as e:
            log.error("the internal %s server on port %d is not reachable: %s", self.port_name, self._internal, e)
            transport.abort()
            return
        local = int(up_writer.get_extra_info("sockname")[1])
        self._peers[local] = Forwarded(identity, address)  # before any byte goes up: the handler finds it
        try:
            await _splice(reader, writer, up_reader, up_writer)
        finally:
            self._peers.pop(local, None)

    async def stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.cancel()
            await asyncio.gather(self._acceptor, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)


async def _splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until either side ends, then close both."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(PIPE_CHUNK):
            writer.write(data)
            await writer.drain()

    tasks = {asyncio.ensure_future(pipe(a_reader, b_writer)), asyncio.ensure_future(pipe(b_reader, a_writer))}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Both ends closed now, not when collected: the internal connection must not outlive its peer's mapping.
        for w in (a_writer, b_writer):
            w.transport.abort()


def _printable(text: str, limit: int = 128) -> str:
    """What a peer sent, safe to log and show: control characters escaped (no forged log lines), bounded."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return out + "..." if len(text) > limit else out
