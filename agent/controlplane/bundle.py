"""Signed bundles: the bytes of a policy (or a revocation list) and an Ed25519 signature over exactly them.

The agent checks the signature with its configured public keys before it parses the payload, so a
tampered, truncated or unsigned bundle is refused without looking inside. Keys are PEM files.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.controlplane._proto.authz.controlplane.v1 import policy_sync_pb2 as pb
from agent.errors import AgentError


class BundleError(AgentError):
    """A bundle that must not be applied: bad signature, wrong service, malformed payload."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.urlsafe_b64encode(hashlib.sha256(raw).digest()[:9]).decode()


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: not an Ed25519 private key")
    return key


def load_verify_keys(path: str | Path) -> list[Ed25519PublicKey]:
    """Every Ed25519 public key in a PEM file (several for a rotation)."""
    text = Path(path).read_bytes()
    keys: list[Ed25519PublicKey] = []
    for block in text.split(b"-----END PUBLIC KEY-----"):
        if b"-----BEGIN PUBLIC KEY-----" not in block:
            continue
        key = serialization.load_pem_public_key(block + b"-----END PUBLIC KEY-----\n")
        if not isinstance(key, Ed25519PublicKey):
            raise BundleError(f"{path}: not an Ed25519 public key")
        keys.append(key)
    if not keys:
        raise BundleError(f"{path}: no public key")
    return keys


def write_keypair(private_path: Path, public_path: Path) -> None:
    """A new Ed25519 key pair: the private key for the control plane, the public one for agents."""
    key = Ed25519PrivateKey.generate()
    private_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    private_path.chmod(0o600)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def sign(payload: bytes, key: Ed25519PrivateKey) -> pb.SignedBundle:
    return pb.SignedBundle(payload=payload, signature=key.sign(payload), key_id=key_id(key.public_key()))


def verified_payload(bundle: pb.SignedBundle, keys: list[Ed25519PublicKey]) -> bytes:
    """The payload, once one of `keys` has verified its signature; BundleError otherwise."""
    if not bundle.signature:
        raise BundleError("unsigned bundle")
    for key in keys:
        try:
            key.verify(bundle.signature, bundle.payload)
        except InvalidSignature:
            continue
        return bytes(bundle.payload)
    raise BundleError("bundle signature does not verify with any configured key")


@dataclass(frozen=True, slots=True)
class PolicyBundle:
    service: str
    version: str
    policy_yaml: str
    issued_at: int
    sequence: int


def policy_payload(service: str, version: str, policy_yaml: str, sequence: int) -> bytes:
    msg = pb.BundlePayload(
        service=service, version=version, policy_yaml=policy_yaml, issued_at=int(time.time()), sequence=sequence
    )
    return bytes(msg.SerializeToString(deterministic=True))


def parse_policy(payload: bytes, service: str) -> PolicyBundle:
    msg = pb.BundlePayload()
    try:
        msg.ParseFromString(payload)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise BundleError("malformed bundle payload") from None
    if msg.service != service:
        raise BundleError(f"bundle for service {msg.service!r}, this agent enforces {service!r}")
    return PolicyBundle(msg.service, msg.version, msg.policy_yaml, msg.issued_at, msg.sequence)


@dataclass(frozen=True, slots=True)
class Revocations:
    """Revoked tokens: by jti, every token of a subject issued before a time, and every credential of a client."""

    sequence: int = 0
    jti: frozenset[str] = frozenset()
    subjects: tuple[tuple[str, str, int], ...] = ()  # (issuer, subject, issued_before)
    clients: tuple[tuple[str, str], ...] = ()  # (issuer or "" for every issuer, client_id)

    def by_subject(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for issuer, subject, before in self.subjects:
            out[(issuer, subject)] = max(before, out.get((issuer, subject), 0))
        return out


def revocations_payload(r: Revocations) -> bytes:
    msg = pb.RevocationList(sequence=r.sequence, issued_at=int(time.time()), jti=sorted(r.jti))
    for issuer, subject, before in r.subjects:
        msg.subjects.add(issuer=issuer, subject=subject, issued_before=before)
    for issuer, client_id in r.clients:
        msg.clients.add(issuer=issuer, client_id=client_id)
    return bytes(msg.SerializeToString(deterministic=True))


def parse_revocations(payload: bytes) -> Revocations:
    msg = pb.RevocationList()
    try:
        msg.ParseFromString(payload)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise BundleError("malformed revocation list") from None
    return Revocations(
        sequence=msg.sequence,
        jti=frozenset(msg.jti),
        subjects=tuple((s.issuer, s.subject, s.issued_before) for s in msg.subjects),
        clients=tuple((c.issuer, c.client_id) for c in msg.clients),
    )
