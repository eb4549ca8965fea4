"""Certificates for the control-plane channel: a trustme CA, and leaves with SPIFFE URI SANs built with `cryptography`
(trustme's issue_cert takes only DNS names, IP addresses and e-mail addresses)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Leaf:
    cert_pem: bytes
    key_pem: bytes
    serial: int

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the DER certificate, hex: what the control plane shows in /status."""
        der = x509.load_pem_x509_certificate(self.cert_pem).public_bytes(serialization.Encoding.DER)
        return hashlib.sha256(der).hexdigest()

    def write(self, cert: Path, key: Path) -> None:
        """Replace both files (each renamed into place, as a deploy or cert-manager does)."""
        for path, data in ((key, self.key_pem), (cert, self.cert_pem)):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)


def issue(
    ca: trustme.CA,
    *identities: str,
    not_after_days: int = 30,
    expired: bool = False,
    valid_for: datetime.timedelta | None = None,
) -> Leaf:
    """A leaf signed by `ca`: an identity with "://" becomes a URI SAN, an IP address an IP SAN, else a DNS SAN.
    `valid_for`: it expires that long from now (a certificate that runs out while its connection is open)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for ident in identities:
        if "://" in ident:
            names.append(x509.UniformResourceIdentifier(ident))
        else:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(ident)))
            except ValueError:
                names.append(x509.DNSName(ident))
    now = datetime.datetime.now(datetime.UTC)
    start, end = (
        (now - datetime.timedelta(days=2), now - datetime.timedelta(days=1))
        if expired
        else (now - datetime.timedelta(minutes=5), now + (valid_for or datetime.timedelta(days=not_after_days)))
    )
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identities[0][:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Leaf(cert.public_bytes(serialization.Encoding.PEM), key_pem, serial)


ORDERS_ID = "spiffe://example.org/ns/shop/sa/orders"
BILLING_ID = "spiffe://example.org/ns/shop/sa/billing"
ADMIN_ID = "spiffe://example.org/ns/ops/sa/operator"
AGENTS_YAML = f"""agents:
  - identity: {ORDERS_ID}
    services: [orders]
  - identity: {BILLING_ID}
    services: [billing]
admins:
  - {ADMIN_ID}
"""


class Pki:
    """A CA with the control plane's server certificate (127.0.0.1, localhost), an admin and any agent leaves, as
    files in `work/pki`, and agents.yaml beside them."""

    def __init__(self, work: Path) -> None:
        self.dir = work / "pki"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_path = self.dir / "ca.pem"
        self.ca_path.write_bytes(self.ca.cert_pem.bytes())
        self.server = self.leaf("server", "127.0.0.1", "localhost")
        self.admin = self.leaf("admin", ADMIN_ID)
        self.agents = self.dir / "agents.yaml"
        self.agents.write_text(AGENTS_YAML)

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"

    def leaf(self, name: str, *identities: str, ca: trustme.CA | None = None) -> Leaf:
        leaf = issue(ca or self.ca, *identities)
        leaf.write(*self.paths(name))
        return leaf

    def server_args(self) -> list[str]:
        cert, key = self.paths("server")
        return ["--tls-cert", str(cert), "--tls-key", str(key), "--client-ca", str(self.ca_path),
                "--agents", str(self.agents)]  # fmt: skip

    def agent_args(self, name: str) -> list[str]:
        cert, key = self.paths(name)
        return ["--control-plane-ca", str(self.ca_path), "--tls-cert", str(cert), "--tls-key", str(key)]

    def client_context(self, name: str | None) -> ssl.SSLContext:
        """What a test client (an admin's curl) uses: trusts the CA, presents `name`'s certificate if given."""
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        if name is not None:
            ctx.load_cert_chain(*self.paths(name))
        return ctx

    def key_material(self) -> list[str]:
        """A line of every private key's PEM body: none may appear in any log or /status."""
        lines = []
        for key in self.dir.glob("*.key"):
            body = [ln for ln in key.read_text().splitlines() if ln and not ln.startswith("-----")]
            lines.extend(body)
        return lines
