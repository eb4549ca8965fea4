"""The load pass context and the generic readers of typed values: numbers, lists, URLs, secret files, times."""

from __future__ import annotations

import base64
import difflib
import math
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config.yamlsrc import LDict
from agent.errors import ConfigError
from agent.urls import fetchable

FIELD_NAME = re.compile(r"[a-z0-9!#$%&'*+\-.^_`|~]+")


class Ctx:
    """One load pass: the file being read and every error found so far."""

    def __init__(self, file: str, base_dir: Path, stand_ins: bool = False) -> None:
        self.file = file
        self.base_dir = base_dir
        self.errors: list[ConfigError] = []
        self.warnings: list[tuple[int, str]] = []  # problems that do not stop the policy loading
        self.now = datetime.now(UTC)  # for warnings only: the clock never makes a policy unloadable
        # `policy test` reads a policy away from its deployment: a secret it cannot read (a key file mounted only
        # in the cluster) gets a throwaway value instead of an error, and each is said in `stood_in`.
        self.stand_ins = stand_ins
        self.stood_in: list[str] = []

    def stand_in(self, line: int, message: str) -> str:
        """A throwaway secret in place of one that cannot be read (only in stand-in mode): 32 random bytes,
        base64 on one line, which every secret reader accepts."""
        self.stood_in.append(f"{self.file}:{line}: {message}; a throwaway value stands in for it")
        return base64.b64encode(os.urandom(32)).decode("ascii")

    def err(self, line: int, message: str, column: int = 0) -> None:
        self.errors.append(ConfigError(message, self.file, line, column))

    def warn(self, line: int, message: str) -> None:
        self.warnings.append((line, message))

    def keys(self, d: LDict, allowed: set[str], where: str) -> None:
        for key in d:
            if key in allowed:
                continue
            hint = difflib.get_close_matches(key, sorted(allowed), n=1)
            fix = f"did you mean {hint[0]!r}?" if hint else f"allowed keys: {', '.join(sorted(allowed))}"
            self.err(d.lines[key], f"{where}: unknown key {key!r}; {fix}")

    def path(self, value: str) -> Path:
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else self.base_dir / p


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {str: "a string", bool: "true or false", int: "an integer", float: "a number", list: "a list"}
    if t == (int, float):
        return "a number"
    if isinstance(t, tuple):
        return " or ".join(names.get(x, x.__name__) for x in t)
    return names.get(t, t.__name__)


def get(ctx: Ctx, d: LDict, key: str, typ: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    if key not in d:
        return default
    v = d[key]
    ok = isinstance(v, typ) and not (isinstance(v, bool) and typ in (int, float, (int, float)))
    if ok and isinstance(v, float) and not math.isfinite(v):
        ok = False
    if not ok:
        ctx.err(d.lines[key], f"{where}.{key} must be {_type_name(typ)}, got {v!r}")
        return default
    return v


def number(ctx: Ctx, d: LDict, key: str, where: str, default: float, minimum: float = 0.0) -> float:
    v = get(ctx, d, key, (int, float), where, None)
    if v is None:
        return default
    if v < minimum:
        ctx.err(d.lines[key], f"{where}.{key} must be at least {minimum}, got {v}")
        return default
    return float(v)


def str_list(ctx: Ctx, d: LDict, key: str, where: str) -> list[str] | None:
    if key not in d:
        return None
    v = d[key]
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        ctx.err(d.lines[key], f"{where}.{key} must be a list of non-empty strings, got {v!r}")
        return None
    return list(v)


def mapping(ctx: Ctx, parent: LDict, key: str, where: str) -> LDict | None:
    v = parent.get(key)
    if v is None:
        return None
    if not isinstance(v, LDict):
        ctx.err(parent.lines[key], f"{where}.{key} must be a mapping, got {v!r}")
        return None
    return v


def url(ctx: Ctx, d: LDict, key: str, where: str) -> str | None:
    v = get(ctx, d, key, str, where)
    if v is None:
        return None
    if fetchable(v):
        return str(v)
    ctx.err(d.lines[key], f"{where}.{key} must be an https:// URL (http:// only to a loopback address), got {v!r}")
    return None


def read_secret(ctx: Ctx, d: LDict, key: str, where: str) -> str | None:
    name = get(ctx, d, key, str, where)
    if name is None:
        return None
    p = ctx.path(name)
    try:
        secret = p.read_text(encoding="utf-8").strip()
    except OSError as e:
        problem = f"{where}.{key}: cannot read {str(p)!r}: {e.strerror}"
    else:
        if secret:
            return secret
        problem = f"{where}.{key}: {str(p)!r} is empty"
    if ctx.stand_ins:
        return ctx.stand_in(d.lines[key], problem)
    ctx.err(d.lines[key], problem)
    return None


def timestamp(ctx: Ctx, d: LDict, key: str, where: str) -> datetime | None:
    if key not in d:
        return None
    v = d[key]
    if isinstance(v, str):
        try:
            v = datetime.fromisoformat(v)
        except ValueError:
            v = None
    if isinstance(v, datetime):
        if v.tzinfo is None:
            ctx.err(d.lines[key], f"{where}.{key} needs a time zone, e.g. 2026-12-01T00:00:00Z")
            return None
        return v
    ctx.err(d.lines[key], f"{where}.{key} must be an ISO 8601 time like 2026-12-01T00:00:00Z, got {d[key]!r}")
    return None
