"""The control-plane channel's TLS: contexts, the TLS front both ports sit behind, refusals, and file rotation.

grpcio's own server TLS refuses a peer without a valid certificate inside its handshake, where Python never
hears of it; the issue wants every refusal counted and shown. So the control plane terminates TLS itself
(Python's ssl, TLS 1.3 only, client certificates required and verified against --client-ca) and forwards each
verified connection to the gRPC (or admin HTTP) server on an internal loopback port. The forwarding connection's
local port maps to the verified peer; a handler looks its caller up there, and a caller not found (someone on
this host connecting to the internal port directly) is refused.

Certificates, keys and agents.yaml are re-read when they change (stat first, then the content compared): new
connections take the new ones; a bad new file is refused (logged, in /status) and the previous one stays. Open
connections keep their peer's certificate: when the client CA changes they are verified again against the new one,
and each is ended when its certificate expires.

Nobody unauthenticated can hold more than a bounded share of the process: handshakes in progress are capped per
front and per source host, established connections per front and per identity (each cap also within what the
process's file-descriptor limit allows), and only identities the agents file knows are forwarded at all.
Nothing here ever logs or shows a certificate's PEM or a key.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import resource
import socket
import ssl
import stat
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

from agent.controlplane.agents import AgentsFile, PeerIdentity, load_agents
from agent.errors import ConfigError

log = logging.getLogger("agent.controlplane")

HANDSHAKE_TIMEOUT_S = 5.0  # a peer that opens a connection and says nothing is dropped after this
# Caps per front (the sync port, the admin port). A real agent holds one connection and handshakes in milliseconds;
# these leave room for thousands of agents while an idle-connection flood is refused at accept(), costing no task.
MAX_HANDSHAKES = 256  # handshakes in progress
MAX_HANDSHAKES_PER_HOST = 32  # ... from one source address (one /64 for IPv6)
MAX_CONNECTIONS = 4096  # verified connections forwarded to the internal server
MAX_CONNECTIONS_PER_IDENTITY = 256  # ... of one certificate identity (its replicas share it; so does the agents table)
FD_RESERVE = 64  # descriptors kept for the process itself (it uses ~16 idle: grpc, logs, policy files)
FDS_PER_CONNECTION = 3  # the peer's socket, the forwarding socket, the internal server's accepted socket
ACCEPT_ERROR_LOG_S = 60.0  # accept() failing (EMFILE): one log line in this time, with how many failed
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
TOO_MANY_CONNECTIONS = "too_many_connections"  # a cap above reached: closed at once
CERTIFICATE_EXPIRED = "certificate_expired"  # an open connection whose certificate's not_after passed
BAD_HELLO = "bad_hello"  # no Hello first, none in time, or an agent_id over MAX_AGENT_ID


@dataclass(frozen=True)
class FrontLimits:
    handshakes: int = MAX_HANDSHAKES
    handshakes_per_host: int = MAX_HANDSHAKES_PER_HOST
    connections: int = MAX_CONNECTIONS
    connections_per_identity: int = MAX_CONNECTIONS_PER_IDENTITY


def front_limits(fronts: int) -> FrontLimits:
    """The caps, lowered so that `fronts` fronts all at their caps still fit under RLIMIT_NOFILE: a flood is
    refused by a cap, never by EMFILE (which would refuse the operator's /status too)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return FrontLimits()
    share = max(8, (soft - FD_RESERVE) // max(1, fronts))
    handshakes = max(2, min(MAX_HANDSHAKES, share // 4))
    connections = max(2, min(MAX_CONNECTIONS, (share - handshakes) // FDS_PER_CONNECTION))
    return FrontLimits(handshakes, min(MAX_HANDSHAKES_PER_HOST, handshakes),
                       connections, min(MAX_CONNECTIONS_PER_IDENTITY, connections))  # fmt: skip


def source_of(host: str) -> str:
    """The key a per-host cap counts under: the address, or its /64 for IPv6 (one host holds a whole /64)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)


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
        serial=_serial(str(info.get("serialNumber", ""))),
        fingerprint=fingerprint(der) if der else "",
    )


def _serial(padded: str) -> str:
    """ssl's serial (hex padded to whole bytes: "0D1B...") as /status shows every serial: the number in hex."""
    try:
        return format(int(padded, 16), "X")
    except ValueError:
        return ""


def peer_certificate(ssl_object: ssl.SSLObject) -> tuple[bytes, float]:
    """The verified peer's DER certificate and its not_after (unix time), kept for as long as its connection."""
    der = ssl_object.getpeercert(binary_form=True) or b""
    if not der:
        return b"", float("inf")  # no certificate (the console's browsers on the admin port): nothing expires
    try:
        not_after = x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()
    except ValueError:
        not_after = 0.0  # cannot happen for a certificate ssl verified; if it did, the first sweep ends it
    return der, not_after


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

    def __init__(self, files: ServerTlsFiles, *, admin_cert_optional: bool = False) -> None:
        self.files = files
        # With the console on, the admin port asks for a client certificate but takes a browser without one
        # (/status still refuses it; /ui wants an OIDC session). The sync port always requires one.
        self.admin_cert_optional = admin_cert_optional
        self.refusals = Refusals()
        self.tls_error: str | None = None
        self.agents_error: str | None = None
        self._tls_stamps = self._stamps_tls()
        self._tls_seen = self._read_tls()
        self.grpc_context, self.admin_context, self.cert = self._contexts()
        self.client_cas = _load_cas(self._tls_seen[2])
        self.ca_generation = 0  # +1 each time a new client CA is taken: open connections are verified again
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
        admin_ctx = server_context(f.cert, f.key, f.client_ca, alpn=["http/1.1"],
                                   require_client_cert=not self.admin_cert_optional)  # fmt: skip
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
        if previous[2] != seen[2]:
            self.client_cas = _load_cas(seen[2])
            self.ca_generation += 1
        what = [name for name, a, b in zip(("certificate", "key", "client CA"), previous, seen, strict=True) if a != b]
        log.info("TLS reloaded (%s changed): new connections use certificate %s", ", ".join(what),
                 self.cert["fingerprint"])  # fmt: skip

    def verifies(self, der: bytes, now: float) -> bool:
        """Whether a connection's certificate still chains to the client CA now in use. With cryptography's
        verifier and an extension policy as lenient as OpenSSL's handshake (the CA must be a CA; the leaf's
        extensions are not judged again). Only the leaf: Python 3.11's ssl does not hand out the peer's chain, so
        a leaf issued by an intermediate the peer sent itself fails here, is ended, and reconnects once through a
        full handshake. Anything unexpected counts as not verified (fail closed, the agent reconnects)."""
        try:
            leaf = x509.load_der_x509_certificate(der)
            verifier = (
                PolicyBuilder()
                .store(Store(self.client_cas))
                .time(datetime.fromtimestamp(now, UTC))
                .extension_policies(ca_policy=_CA_POLICY, ee_policy=ExtensionPolicy.permit_all())
                .build_client_verifier()
            )
            verifier.verify(leaf, [])
        except (VerificationError, ValueError, TypeError):
            return False
        return True

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


_CA_POLICY = ExtensionPolicy.permit_all().require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)


def _load_cas(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []  # ssl took the file, so this does not happen; with no CA nothing verifies again (fail closed)


@dataclass(frozen=True, eq=False)  # one per connection, hashed by identity: two with the same peer stay two
class Forwarded:
    """A connection that passed the TLS front: who it is, where it came from, and its certificate."""

    identity: PeerIdentity
    address: str
    der: bytes = b""  # the peer's certificate (DER): verified again when the client CA changes
    not_after: float = float("inf")  # when it expires (unix time): the connection is ended then


class TlsFront:
    """TLS terminated here, every handshake refusal counted, each verified connection forwarded to `internal`."""

    def __init__(
        self,
        listen: str,
        context: Callable[[], ssl.SSLContext],
        refusals: Refusals,
        port_name: str,
        admit: Callable[[PeerIdentity], tuple[str, str] | None] = lambda _: None,
        limits: FrontLimits | None = None,
    ) -> None:
        self.listen = listen
        self._context = context
        self._refusals = refusals
        self.port_name = port_name  # "sync" or "admin", in refusals
        self._admit = admit  # (reason, detail) when a verified identity may not be forwarded at all
        self.limits = limits or FrontLimits()
        self.port = 0
        self._internal = 0
        self._sock: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._peers: dict[int, Forwarded] = {}  # the forwarding connection's local port -> its peer
        self._handshakes: Counter[str] = Counter()  # source -> handshakes in progress
        self._handshaking = 0
        self._identities: Counter[str] = Counter()  # identity -> forwarded connections
        self._open: dict[Forwarded, Callable[[], None]] = {}  # each forwarded connection -> what ends it
        self.accept_errors = 0

    def counts(self) -> dict[str, int]:
        """What /status shows of this front's load."""
        return {"handshakes": self._handshaking, "connections": len(self._open)}

    def open_peers(self) -> list[Forwarded]:
        return list(self._open)

    def end(self, peer: Forwarded) -> None:
        """End a forwarded connection (both ends): its certificate expired, or the new client CA refuses it."""
        close = self._open.pop(peer, None)
        if close is not None:
            close()

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
        logged_at, unlogged = -ACCEPT_ERROR_LOG_S, 0
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as e:  # EMFILE and the like: wait a little rather than spin, and say so once a minute
                self.accept_errors += 1
                now = time.monotonic()
                if now - logged_at >= ACCEPT_ERROR_LOG_S:
                    more = f" ({unlogged} more failures in the last minute, not logged)" if unlogged else ""
                    log.error("accepting on the %s port failed: %s; %d handshakes and %d connections open%s",
                              self.port_name, e, self._handshaking, len(self._open), more)  # fmt: skip
                    logged_at, unlogged = now, 0
                else:
                    unlogged += 1
                await asyncio.sleep(0.1)
                continue
            address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
            source = source_of(str(peer[0]) if isinstance(peer, tuple) else str(peer))
            over = self._over_handshake_cap(source)
            if over is not None:
                conn.close()  # before any task or TLS state exists for it
                self.refuse(TOO_MANY_CONNECTIONS, address, None, None, over)
                continue
            self._handshaking += 1
            self._handshakes[source] += 1
            task = loop.create_task(self._serve(conn, address, source))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    def _over_handshake_cap(self, source: str) -> str | None:
        if self._handshaking >= self.limits.handshakes:
            return f"{self._handshaking} TLS handshakes in progress on this port (the cap)"
        if self._handshakes[source] >= self.limits.handshakes_per_host:
            return f"{self._handshakes[source]} TLS handshakes in progress from {source} (the cap per host)"
        return None

    def _handshake_done(self, source: str) -> None:
        self._handshaking -= 1
        self._handshakes[source] -= 1
        if self._handshakes[source] <= 0:
            del self._handshakes[source]

    def _over_connection_cap(self, who: str) -> str | None:
        if len(self._open) >= self.limits.connections:
            return f"{len(self._open)} connections open on this port (the cap)"
        if self._identities[who] >= self.limits.connections_per_identity:
            return f"{self._identities[who]} connections open for this identity (the cap per identity)"
        return None

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

    async def _serve(self, conn: socket.socket, address: str, source: str) -> None:
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
        finally:
            self._handshake_done(source)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        ssl_object = writer.get_extra_info("ssl_object")
        identity = peer_identity(ssl_object)
        # Refused here, not held open until its first request: an identity the agents file does not know.
        # A peer without a certificate (a console browser) is counted by its source host, not as one identity.
        who = identity.name or identity.fingerprint or f"no certificate from {source}"
        refusal = self._admit(identity)
        if refusal is None and (over := self._over_connection_cap(who)) is not None:
            refusal = (TOO_MANY_CONNECTIONS, over)
        if refusal is not None:
            self.refuse(refusal[0], address, identity.name, None, refusal[1])
            transport.abort()
            return
        self._identities[who] += 1
        try:
            await self._forward(reader, writer, Forwarded(identity, address, *peer_certificate(ssl_object)))
        finally:
            self._identities[who] -= 1
            if self._identities[who] <= 0:
                del self._identities[who]

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Forwarded) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._internal)
        except OSError as e:
            log.error("the internal %s server on port %d is not reachable: %s", self.port_name, self._internal, e)
            writer.transport.abort()
            return
        local = int(up_writer.get_extra_info("sockname")[1])
        self._peers[local] = peer  # before any byte goes up: the handler finds it

        def close() -> None:
            writer.transport.abort()
            up_writer.transport.abort()

        self._open[peer] = close
        try:
            await _splice(reader, writer, up_reader, up_writer)
        finally:
            self._peers.pop(local, None)
            self._open.pop(peer, None)

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
    """What a peer sent, safe to log and show: control characters escaped (no forged log lines), bounded to
    `limit` characters as shown (an escape counts its length), "..." marking a cut."""
    out: list[str] = []
    size = 0
    for c in text[: limit + 1]:
        shown = c if c.isprintable() else repr(c)[1:-1]
        if size + len(shown) > limit:
            return "".join(out) + "..."
        out.append(shown)
        size += len(shown)
    return "".join(out)
