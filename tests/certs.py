"""Certificates for the control-plane channel: a trustme CA, and leaves with SPIFFE URI SANs built with `cryptography`
(trustme's issue_cert takes only DNS names, IP addresses and e-mail addresses)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
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


def issue(ca: trustme.CA, *identities: str, not_after_days: int = 30, expired: bool = False) -> Leaf:
    """A leaf signed by `ca`: an identity with "://" becomes a URI SAN, an IP address an IP SAN, else a DNS SAN."""
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
        else (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=not_after_days))
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
