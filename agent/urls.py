"""Which URLs the agent may fetch keys and introspect at: https, or plain http only to a loopback address."""

from __future__ import annotations

from urllib.parse import urlsplit


def is_loopback(host: str) -> bool:
    return host in {"localhost", "::1"} or host.startswith("127.")


def fetchable(url: str) -> bool:
    """https:// with a host, or http:// to loopback (local test and demo identity providers)."""
    u = urlsplit(url)
    host = u.hostname or ""
    return bool(host) and (u.scheme == "https" or (u.scheme == "http" and is_loopback(host)))
