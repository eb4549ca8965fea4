"""Strict base64url and JSON for JOSE: one canonical spelling per value, nothing a lenient parser would guess."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url_decode(s: str) -> bytes:
    """Decode unpadded base64url; refuse padding, '+', '/', whitespace and non-canonical trailing bits."""
    if _B64URL.fullmatch(s) is None or len(s) % 4 == 1:
        raise ValueError("not unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except binascii.Error:
        raise ValueError("not base64url") from None
    # Two spellings of the same bytes would let one token have several cache keys and hashes.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != s:
        raise ValueError("non-canonical base64url")
    return raw


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _pairs_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            # Parsers disagree on which duplicate wins; a token must mean one thing to every reader.
            raise ValueError("duplicate member")
        out[k] = v
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json_object(raw: bytes) -> dict[str, Any]:
    """Parse UTF-8 JSON that must be an object: no duplicate members, no NaN/Infinity, no BOM."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if text.startswith("\ufeff"):
        raise ValueError("byte order mark")
    try:
        value = json.loads(text, object_pairs_hook=_pairs_no_duplicates, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise ValueError("not strict JSON") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def is_number(v: object) -> bool:
    """A JSON number: int or finite float, and never a boolean (True is an int in Python)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, float) and math.isfinite(v)
