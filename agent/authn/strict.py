"""Strict base64url and JSON for JOSE: one canonical spelling per value, nothing a lenient parser would guess."""

from __future__ import annotations

import base64
import math

# Cython when built; the contracts are in agent/authn/_b64_py.py and agent/authn/_jsonobj_py.py.
from agent.authn._b64 import b64url_decode
from agent.authn._jsonobj import strict_json_object

__all__ = ["MAX_NUMERIC_DATE", "b64url_decode", "b64url_encode", "is_number", "numeric_date", "strict_json_object"]

# The last second of 9999-12-31 UTC: beyond it no token time means anything, and datetime cannot show it.
MAX_NUMERIC_DATE = 253_402_300_799


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def is_number(v: object) -> bool:
    """A JSON number: int or finite float, and never a boolean (True is an int in Python)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, float) and math.isfinite(v)


def numeric_date(v: object) -> float | None:
    """An RFC 7519 NumericDate between 1970 and MAX_NUMERIC_DATE as a float; None for anything else.

    Booleans, negative, huge (a 400-digit integer would overflow float()), NaN and infinite values are None:
    the caller refuses them as invalid claims.
    """
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    # Compared before any float(): an int compares exactly however large; NaN fails both comparisons.
    if not 0 <= v <= MAX_NUMERIC_DATE:
        return None
    return float(v)
