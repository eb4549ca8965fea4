"""Certificate-bound tokens (RFC 8705 §3): the SHA-256 thumbprint of the client's leaf certificate.

The certificate is the one Envoy verified on its TLS listener and passes in CheckRequest
`source.certificate` (include_peer_certificate: URL-encoded PEM). A client-sent header such as
`x-forwarded-client-cert` is never read: only Envoy's own attribute is evidence.
"""

from __future__ import annotations

import base64
import hashlib
from collections import OrderedDict
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

_MAX_PEM = 16384


class CertificateThumbprints:
    """`x5t#S256` of PEM certificates, remembered for the few certificates a pod's callers present."""

    def __init__(self, max_entries: int = 1024) -> None:
        self._by_pem: OrderedDict[str, str | None] = OrderedDict()
        self._max = max_entries

    def of(self, url_encoded_pem: str) -> str | None:
        """The base64url SHA-256 of the leaf certificate's DER, or None when there is no usable certificate."""
        if not url_encoded_pem or len(url_encoded_pem) > _MAX_PEM:
            return None
        hit = self._by_pem.get(url_encoded_pem, "")
        if hit != "":
            return hit
        try:
            cert = x509.load_pem_x509_certificate(unquote(url_encoded_pem).encode("ascii"))
            der = cert.public_bytes(Encoding.DER)
            thumbprint: str | None = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
        except (ValueError, UnicodeEncodeError):
            thumbprint = None
        if len(self._by_pem) >= self._max:
            self._by_pem.popitem(last=False)
        self._by_pem[url_encoded_pem] = thumbprint
        return thumbprint
