"""Every policy version the control plane published, per service: its text, version, sequence, time, lint warnings
and what its tests said. The console's Policies page lists them and diffs any two.

Under `--state-dir DIR` each version is `DIR/history/SERVICE/SEQUENCE.json` (directories 0700, files 0600, written
atomically), read back on start so sequences go on across restarts; without, they are kept in memory since start.
Either way the newest `KEEP` versions of a service are kept, older ones are deleted.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from agent.files import write_atomically

log = logging.getLogger("agent.controlplane.history")

KEEP = 100  # versions kept per service
HISTORY_DIR = "history"
_ENTRY = re.compile(r"(\d{1,19})\.json")
_SERVICE = re.compile(r"[^/\\\x00]{1,255}")  # a file name of the policies directory, less `.yaml`


@dataclass(frozen=True, slots=True)
class Version:
    """One published version (the text is read on demand when it is on disk)."""

    service: str
    sequence: int
    version: str
    published_at: float
    warnings: tuple[str, ...] = ()
    tests: dict[str, Any] | None = field(default=None, compare=False)  # None: published without a test file

    def as_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "sequence": self.sequence,
            "version": self.version,
            "published_at": self.published_at,
            "warnings": list(self.warnings),
            "tests": self.tests,
        }


class History:
    """Published versions per service, newest last; `add` is called by the publisher in the event loop."""

    def __init__(self, state_dir: Path | None) -> None:
        self.root = state_dir / HISTORY_DIR if state_dir is not None else None
        self._versions: dict[str, deque[Version]] = {}
        self._texts: dict[tuple[str, int], str] = {}  # in memory only (without a state dir)
        self._lock = threading.Lock()
        if self.root is not None:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._load()

    @property
    def persistent(self) -> bool:
        return self.root is not None

    def _load(self) -> None:
        assert self.root is not None
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            found = sorted(int(m[1]) for p in directory.iterdir() if (m := _ENTRY.fullmatch(p.name)))
            kept: deque[Version] = deque(maxlen=KEEP)
            for sequence in found[-KEEP:]:
                try:
                    doc = orjson.loads((directory / f"{sequence}.json").read_bytes())
                    kept.append(_version(doc))
                except (OSError, ValueError, KeyError, TypeError) as e:
                    log.error("%s/%d.json is not a readable history entry (skipped): %s", directory, sequence, e)
            if kept:
                self._versions[directory.name] = kept

    def last(self, service: str) -> Version | None:
        versions = self._versions.get(service)
        return versions[-1] if versions else None

    def services(self) -> list[str]:
        return sorted(self._versions)

    def versions(self, service: str) -> list[Version]:
        """Oldest first."""
        return list(self._versions.get(service, ()))

    def get(self, service: str, sequence: int) -> Version | None:
        return next((v for v in self._versions.get(service, ()) if v.sequence == sequence), None)

    def text(self, service: str, sequence: int) -> str | None:
        """The policy text of one kept version, or None when it is not kept (anymore)."""
        if self.get(service, sequence) is None:
            return None
        if self.root is None:
            return self._texts.get((service, sequence))
        try:
            doc = orjson.loads((self.root / service / f"{sequence}.json").read_bytes())
        except (OSError, ValueError):
            return None
        text = doc.get("policy_yaml") if isinstance(doc, dict) else None
        return text if isinstance(text, str) else None

    def add(self, entry: Version, text: str) -> None:
        """Keep a newly published version (on disk first, with a state dir); the oldest beyond KEEP go."""
        if _SERVICE.fullmatch(entry.service) is None or entry.service.startswith("."):
            raise ValueError(f"service name {entry.service!r} cannot name a history directory")
        with self._lock:
            versions = self._versions.setdefault(entry.service, deque(maxlen=KEEP))
            dropped = versions[0] if len(versions) == KEEP else None
            if self.root is not None:
                directory = self.root / entry.service
                directory.mkdir(mode=0o700, exist_ok=True)
                data = orjson.dumps({**entry.as_dict(), "policy_yaml": text})
                write_atomically(directory / f"{entry.sequence}.json", data, 0o600)
                if dropped is not None:
                    (directory / f"{dropped.sequence}.json").unlink(missing_ok=True)
            else:
                self._texts[(entry.service, entry.sequence)] = text
                if dropped is not None:
                    self._texts.pop((entry.service, dropped.sequence), None)
            versions.append(entry)


def _version(doc: Any) -> Version:
    tests = doc.get("tests")
    return Version(
        service=str(doc["service"]),
        sequence=int(doc["sequence"]),
        version=str(doc["version"]),
        published_at=float(doc["published_at"]),
        warnings=tuple(str(w) for w in doc.get("warnings") or ()),
        tests=tests if isinstance(tests, dict) else None,
    )
