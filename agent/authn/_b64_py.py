"""Strict unpadded base64url decoding in Python: the pure twin of native/_b64.pyx (agent._b64_c)."""

from __future__ import annotations

import base64
import binascii
import re

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
# pragma: allowlist nextline secret (the base64url alphabet)
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
