"""revocations.yaml: read strictly (the control plane's poll), and rewritten with one more entry (the console).

The file operators edit by hand stays the one source: the console adds its entry to what the file holds now and
writes it back atomically (comments are not kept; the first line says so), and the poll publishes it like a hand
edit. Format:

    jti: [0f8c2a...]
    subjects:
      - {issuer: "https://idp.example.com", subject: mallory, issued_before: "2026-11-23T06:00:00Z"}
    clients:
      - batch-exporter                                   # every credential of this client id, any issuer
      - {client_id: partner-x, issuer: "https://idp.example.com"}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from agent.config.yamlsrc import line_of

KEYS = ("jti", "subjects", "clients")
# What a console form may submit: bounded and printable (no control characters, no surrounding spaces).
MAX_JTI = 256
MAX_SUBJECT = 1024  # the engine's bound on a token's sub
MAX_ISSUER = 2048
MAX_CLIENT_ID = 256
MAX_REASON = 500
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
HEADER = "# Written by the authz-agent console (comments are not kept). Hand edits are read as before.\n"


@dataclass(frozen=True, slots=True)
class RevocationEntries:
    """What the file revokes, in the form the bundle carries."""

    jti: frozenset[str] = frozenset()
    subjects: tuple[tuple[str, str, int], ...] = ()  # (issuer, subject, issued_before)
    clients: tuple[tuple[str, str], ...] = ()  # (issuer or "", client_id)


def parse_revocations(doc: Any, path: Path) -> RevocationEntries:
    """The lists of revocations.yaml (read by load_yaml: a key given twice is an error, not a list dropped)."""
    if not isinstance(doc, dict) or set(doc) - set(KEYS):
        raise ValueError(f"{path}:{line_of(doc, None, 1)}: expected 'jti: [...]', "
                         "'subjects: [{issuer, subject, issued_before}]' and/or 'clients: [client_id | "
                         "{client_id, issuer}]'")  # fmt: skip
    jti = doc.get("jti") or []
    if not isinstance(jti, list) or not all(isinstance(j, str) and j for j in jti):
        raise ValueError(f"{path}:{line_of(doc, 'jti', 1)}: jti must be a list of strings")
    subjects = []
    listed = doc.get("subjects") or []
    if not isinstance(listed, list):
        raise ValueError(f"{path}:{line_of(doc, 'subjects', 1)}: subjects must be a list")
    for i, s in enumerate(listed):
        where = f"{path}:{line_of(listed, i, 1)}: subjects[{i}]"
        if not isinstance(s, dict) or set(s) != {"issuer", "subject", "issued_before"}:
            raise ValueError(f"{where} needs issuer, subject and issued_before")
        before = s["issued_before"]
        if isinstance(before, str):
            try:
                before = datetime.fromisoformat(before)
            except ValueError:
                raise ValueError(f"{where}.issued_before is not a time: {before!r}") from None
        if isinstance(before, datetime):
            if before.tzinfo is None:
                raise ValueError(f"{where}.issued_before needs a time zone")
            before = int(before.timestamp())
        if not isinstance(before, int) or isinstance(before, bool):
            raise ValueError(f"{where}.issued_before must be a time or unix seconds")
        subjects.append((str(s["issuer"]), str(s["subject"]), before))
    clients = []
    listed = doc.get("clients") or []
    if not isinstance(listed, list):
        raise ValueError(f"{path}:{line_of(doc, 'clients', 1)}: clients must be a list")
    for i, c in enumerate(listed):
        where = f"{path}:{line_of(listed, i, 1)}: clients[{i}]"
        if isinstance(c, str) and c:
            clients.append(("", c))
            continue
        if not isinstance(c, dict) or "client_id" not in c or set(c) - {"client_id", "issuer"}:
            raise ValueError(f"{where} must be a client id, or {{client_id, issuer}}")
        client_id, issuer = c["client_id"], c.get("issuer", "")
        if not isinstance(client_id, str) or not client_id or not isinstance(issuer, str):
            raise ValueError(f"{where}: client_id must be a non-empty string, issuer a string")
        clients.append((issuer, client_id))
    return RevocationEntries(frozenset(jti), tuple(sorted(subjects)), tuple(sorted(set(clients))))


def checked(value: str, what: str, limit: int, *, required: bool = True) -> str:
    """A form value as revoked: bounded and printable; raises ValueError with what is wrong (the value unshown)."""
    if not value:
        if required:
            raise ValueError(f"{what} is required")
        return ""
    if len(value) > limit:
        raise ValueError(f"{what} is longer than {limit} characters")
    if _CONTROL.search(value) is not None:
        raise ValueError(f"{what} holds a control character")
    if value != value.strip():
        raise ValueError(f"{what} starts or ends with a space")
    return value


def with_entry(entries: RevocationEntries, kind: str, target: dict[str, str], now: int) -> RevocationEntries:
    """`entries` plus one revocation (kind jti, subject or client); a subject revoked again moves its time."""
    if kind == "jti":
        return RevocationEntries(entries.jti | {target["jti"]}, entries.subjects, entries.clients)
    if kind == "subject":
        key = (target["issuer"], target["subject"])
        subjects = [s for s in entries.subjects if (s[0], s[1]) != key] + [(*key, now)]
        return RevocationEntries(entries.jti, tuple(sorted(subjects)), entries.clients)
    if kind == "client":
        clients = set(entries.clients) | {(target.get("issuer", ""), target["client_id"])}
        return RevocationEntries(entries.jti, entries.subjects, tuple(sorted(clients)))
    raise ValueError(f"unknown revocation kind {kind!r}")


def render(entries: RevocationEntries) -> str:
    """The file's text for `entries` (sorted, one entry per line, times in UTC)."""
    doc: dict[str, Any] = {}
    if entries.jti:
        doc["jti"] = sorted(entries.jti)
    if entries.subjects:
        doc["subjects"] = [
            {"issuer": i, "subject": s, "issued_before": datetime.fromtimestamp(b, UTC).isoformat()}
            for i, s, b in entries.subjects
        ]
    if entries.clients:
        doc["clients"] = [c if not i else {"client_id": c, "issuer": i} for i, c in entries.clients]
    body = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=None, width=1 << 16)
    return HEADER + (body if doc else "{}\n")
