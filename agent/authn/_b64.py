"""Strict base64url: the Cython decoder when built, else the pure twin (AGENT_NO_EXTENSIONS=1)."""

from __future__ import annotations

import os

if not os.environ.get("AGENT_NO_EXTENSIONS"):
    try:
        from agent._b64_c import b64url_decode
    except ImportError:  # not built here: the pure twin serves
        from agent.authn._b64_py import b64url_decode
else:
    from agent.authn._b64_py import b64url_decode

__all__ = ["b64url_decode"]
