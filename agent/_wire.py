"""CheckRequest/CheckResponse wire codec: the Cython one when built, else the pure twin (AGENT_NO_EXTENSIONS=1)."""

from __future__ import annotations

import os

NO_EXTENSIONS = bool(os.environ.get("AGENT_NO_EXTENSIONS"))

if not NO_EXTENSIONS:
    try:
        from agent._wire_c import WireError, decode_check_request, encode_check_response
    except ImportError:  # not built here: the pure twin serves
        from agent._wire_py import WireError, decode_check_request, encode_check_response
else:
    from agent._wire_py import WireError, decode_check_request, encode_check_response

__all__ = ["WireError", "decode_check_request", "encode_check_response"]
