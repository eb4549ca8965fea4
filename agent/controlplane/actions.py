"""The console's action log: who did what, when and why, append-only and hash-chained like the audit log.

Under `--state-dir DIR` it is `DIR/console-actions.log` (JSON lines, 0600, the audit log's chain: `authz-agent
audit verify DIR/console-actions.log` checks it); without, it is kept in memory since start. Either way the newest
`KEEP_SHOWN` records are held for the pages, and the last record of every target (a jti, a subject, a client), so
the revocations page can say who revoked each entry. Records hold identifiers (a jti, a subject, a client id),
never a token, a session or a secret.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from agent.audit.chain import Chain

log = logging.getLogger("agent.controlplane.actions")

ACTIONS_FILE = "console-actions.log"
KEEP_SHOWN = 1000  # records held for the pages (the file keeps all)
MAX_READ_BYTES = 64 << 20  # the file read at start, at most (its tail)


@dataclass(frozen=True, slots=True)
class Actor:
    """The OIDC user behind an action (the id token's subject and name)."""

    subject: str
    name: str


class ActionLog:
    """Append-only: `record` chains a new record after the last one (resumed from the file on start)."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = state_dir / ACTIONS_FILE if state_dir is not None else None
        self.recent: deque[dict[str, Any]] = deque(maxlen=KEEP_SHOWN)
        self.by_target: dict[str, dict[str, Any]] = {}  # target key -> the last record about it
        self._lock = threading.Lock()
        self.chain = Chain()
        if self.path is not None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.chain, partial = Chain.resume(self.path)
            if partial:
                log.error("%s ends in a partial record (a crash mid-write, or an edit): appended after it; "
                          "`authz-agent audit verify` names it", self.path)  # fmt: skip
            self._load()

    @property
    def persistent(self) -> bool:
        return self.path is not None

    def _load(self) -> None:
        assert self.path is not None
        try:
            with self.path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - MAX_READ_BYTES))
                data = f.read()
        except FileNotFoundError:
            return
        for line in data.split(b"\n"):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("target"), dict):
                self._hold(record)

    def _hold(self, record: dict[str, Any]) -> None:
        self.recent.append(record)
        self.by_target[target_key(record.get("action", ""), record["target"])] = record

    def record(self, actor: Actor, action: str, target: dict[str, str], reason: str, **extra: Any) -> dict[str, Any]:
        """Append one record (written and flushed to disk before this returns, with --state-dir)."""
        body: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "actor": {"subject": actor.subject, "name": actor.name},
            "action": action,
            "target": target,
            "reason": reason,
            **extra,
        }
        with self._lock:
            before = (self.chain.seq, self.chain.prev)
            line = self.chain.link(orjson.dumps(body))
            if self.path is not None:
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                    try:
                        os.write(fd, line + b"\n")
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                except OSError:
                    self.chain.seq, self.chain.prev = before  # not written: the next record links to the last one
                    raise
            record: dict[str, Any] = orjson.loads(line)
            self._hold(record)
        return record

    def newest(self, limit: int = 100) -> list[dict[str, Any]]:
        return list(reversed(self.recent))[:limit]


def target_key(action: str, target: dict[str, Any]) -> str:
    """One key per revoked thing, whichever action named it."""
    kind = action.removeprefix("revoke_")
    if kind == "jti":
        return f"jti\0{target.get('jti', '')}"
    if kind == "subject":
        return f"subject\0{target.get('issuer', '')}\0{target.get('subject', '')}"
    if kind == "client":
        return f"client\0{target.get('issuer', '')}\0{target.get('client_id', '')}"
    return f"{action}\0{orjson.dumps(target, option=orjson.OPT_SORT_KEYS).decode()}"
