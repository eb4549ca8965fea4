"""Strict base64url and JSON for JOSE: one canonical spelling per value, nothing a lenient parser would guess."""

from __future__ import annotations

import base64
import math

# Cython when built; the contracts are in agent/authn/_b64_py.py and agent/authn/_jsonobj_py.py.
from agent.authn._b64 import b64url_decode
from agent.authn._jsonobj import strict_json_object

__all__ = ["b64url_decode", "b64url_encode", "is_number", "strict_json_object"]


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def is_number(v: object) -> bool:
    """A JSON number: int or finite float, and never a boolean (True is an int in Python)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, float) and math.isfinite(v)
