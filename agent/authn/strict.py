"""Strict base64url and JSON for JOSE: one canonical spelling per value, nothing a lenient parser would guess."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

# Strict unpadded base64url: Cython when built; the contract is in agent/authn/_b64_py.py.
from agent.authn._b64 import b64url_decode

__all__ = ["b64url_decode", "b64url_encode", "is_number", "strict_json_object"]


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


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs_no_duplicates, parse_constant=_refuse_constant)


def strict_json_object(raw: bytes) -> dict[str, Any]:
    """Parse UTF-8 JSON that must be an object: no duplicate members, no NaN/Infinity, no BOM."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if text.startswith("\ufeff"):
        raise ValueError("byte order mark")
    try:
        value = _DECODER.decode(text)
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
