"""agents.yaml: which certificate identity may fetch and report for which services, and who may read /status.

An identity with "://" (a SPIFFE ID) is matched against a certificate's URI SANs, any other against its DNS SANs;
exact strings only, no wildcards: a pattern that matches more than meant is the mistake this file must not allow.
Read as strictly as a policy: an unknown key, a wrong type, an empty or repeated identity is an error at its line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config.loader import read_bounded
from agent.config.yamlsrc import LDict, line_of, load_yaml
from agent.errors import ConfigError

MAX_AGENTS_BYTES = 8 << 20  # the bound a policy file is held to
_TOP_KEYS = {"agents", "admins"}
_ENTRY_KEYS = {"identity", "services"}


@dataclass(frozen=True)
class PeerIdentity:
    """What a verified client certificate says of its holder (never the certificate itself)."""

    uris: tuple[str, ...]
    dns: tuple[str, ...]
    serial: str = ""  # hex, without leading zeros (as /status shows the control plane's own)
    fingerprint: str = ""  # SHA-256 of the DER certificate, hex

    @property
    def name(self) -> str | None:
        """One name to show: the first URI SAN (a SPIFFE ID), else the first DNS SAN."""
        return (self.uris or self.dns or (None,))[0]

    def matches(self, identity: str) -> bool:
        return identity in (self.uris if "://" in identity else self.dns)


@dataclass(frozen=True)
class AgentsFile:
    services: dict[str, frozenset[str]]  # identity -> services it may fetch and report for
    admins: frozenset[str]  # identities allowed on the admin port

    def services_of(self, peer: PeerIdentity) -> frozenset[str] | None:
        """The services every matching entry grants (a certificate may carry several SANs); None: no entry."""
        granted = [services for identity, services in self.services.items() if peer.matches(identity)]
        return frozenset().union(*granted) if granted else None

    def is_admin(self, peer: PeerIdentity) -> bool:
        return any(peer.matches(identity) for identity in self.admins)


def load_agents(path: Path) -> AgentsFile:
    """Read and validate agents.yaml; ConfigError (file:line) on the first problem."""
    file = str(path)
    try:
        text = read_bounded(path, MAX_AGENTS_BYTES)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot read the agents file: {e}", file, 0) from None
    return parse_agents(text, file)


def parse_agents(text: str, file: str) -> AgentsFile:
    doc = load_yaml(text, file)
    if not isinstance(doc, LDict):
        raise ConfigError("agents.yaml must be a mapping: 'agents: [{identity, services}]', 'admins: [...]'", file, 1)
    _no_unknown(doc, _TOP_KEYS, "agents.yaml", file)
    entries = doc.get("agents", [])
    if not isinstance(entries, list):
        raise ConfigError("'agents' must be a list of {identity, services}", file, line_of(doc, "agents", 1))
    services: dict[str, frozenset[str]] = {}
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        line = line_of(entries, i, 1)
        if not isinstance(entry, LDict):
            raise ConfigError(f"agents[{i}] must be a mapping with 'identity' and 'services'", file, line)
        _no_unknown(entry, _ENTRY_KEYS, f"agents[{i}]", file)
        missing = sorted(_ENTRY_KEYS - entry.keys())
        if missing:
            raise ConfigError(f"agents[{i}] needs '{missing[0]}'", file, line)
        identity = _identity(entry.get("identity"), f"agents[{i}].identity", file, line_of(entry, "identity", line))
        if identity in seen:
            raise ConfigError(f"agents[{i}]: identity {identity!r} is listed twice (first at line {seen[identity]}); "
                              "list all its services in one entry", file, line_of(entry, "identity", line))  # fmt: skip
        seen[identity] = line_of(entry, "identity", line)
        listed = entry["services"]
        where = line_of(entry, "services", line)
        if not isinstance(listed, list) or not listed or not all(isinstance(s, str) and s for s in listed):
            raise ConfigError(f"agents[{i}].services must be a non-empty list of service names", file, where)
        if len(set(listed)) != len(listed):
            raise ConfigError(f"agents[{i}].services names a service twice", file, where)
        services[identity] = frozenset(listed)
    admins_list = doc.get("admins", [])
    if not isinstance(admins_list, list):
        raise ConfigError("'admins' must be a list of identities", file, line_of(doc, "admins", 1))
    admins: dict[str, int] = {}
    for i, item in enumerate(admins_list):
        line = line_of(admins_list, i, 1)
        identity = _identity(item, f"admins[{i}]", file, line)
        if identity in admins:
            raise ConfigError(f"admins[{i}]: {identity!r} is listed twice (first at line {admins[identity]})",
                              file, line)  # fmt: skip
        admins[identity] = line
    return AgentsFile(services, frozenset(admins))


def _identity(value: Any, what: str, file: str, line: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what} must be a non-empty string (a SPIFFE URI or a DNS name)", file, line)
    if value != value.strip() or any(c in value for c in "*?"):
        raise ConfigError(f"{what} {value!r}: exact names only (no spaces around it, no wildcards)", file, line)
    return value


def _no_unknown(doc: LDict, allowed: Iterable[str], what: str, file: str) -> None:
    for key in doc:
        if key not in allowed:
            raise ConfigError(f"{what}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})",
                              file, line_of(doc, key, 1))  # fmt: skip
