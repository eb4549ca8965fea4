"""Strict JSON objects for JOSE in Python: the pure twin of native/_jsonobj.pyx (agent._jsonobj_c).

The contract both keep: UTF-8 without a BOM; a JSON object at the top; no duplicate members at any level
(parsers disagree on which wins, and a token must mean one thing to every reader); no NaN or Infinity,
literal or by overflow (1e400); no lone surrogates; nesting at most MAX_DEPTH deep. ValueError otherwise.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32


def _pairs_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError("duplicate member")
        out[k] = v
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_pairs_no_duplicates, parse_constant=_refuse_constant, parse_float=_finite_float
)


def _check(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("nested too deep")
    if isinstance(value, str):
        value.encode("utf-8")  # a lone surrogate (from a \\ud800 escape) cannot be encoded
    elif isinstance(value, dict):
        for k, v in value.items():
            k.encode("utf-8")
            _check(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check(v, depth + 1)


def strict_json_object(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if text.startswith("\ufeff"):
        raise ValueError("byte order mark")
    try:
        value = _DECODER.decode(text)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        _check(value, 1)
    except (ValueError, RecursionError, UnicodeEncodeError) as e:
        raise ValueError(f"not strict JSON ({type(e).__name__})") from None
    return value
