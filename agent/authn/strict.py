"""Strict base64url and JSON for JOSE: one canonical spelling per value, nothing a lenient parser would guess."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# The last character of a 2- or 3-character tail carries 4 or 2 spare bits, which must be zero.
_CANONICAL_LAST = {
    2: frozenset(c for i, c in enumerate(_ALPHABET) if i & 0x0F == 0),
    3: frozenset(c for i, c in enumerate(_ALPHABET) if i & 0x03 == 0),
}
_PAD = ("", "", "==", "=")


def b64url_decode(s: str) -> bytes:
    """Decode unpadded base64url; refuse padding, '+', '/', whitespace and non-canonical trailing bits."""
    tail = len(s) % 4
    if tail == 1 or _B64URL.fullmatch(s) is None:
        raise ValueError("not unpadded base64url")
    # Two spellings of the same bytes would let one token have several cache keys and hashes.
    if tail and s[-1] not in _CANONICAL_LAST[tail]:
        raise ValueError("non-canonical base64url")
    try:
        return base64.urlsafe_b64decode(s + _PAD[tail])
    except binascii.Error:
        raise ValueError("not base64url") from None


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
