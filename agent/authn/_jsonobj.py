"""Strict JSON objects: the Cython/orjson one when built, else the pure twin (AGENT_NO_EXTENSIONS=1)."""

from __future__ import annotations

import os

if not os.environ.get("AGENT_NO_EXTENSIONS"):
    try:
        from agent._jsonobj_c import strict_json_object
    except ImportError:  # not built here: the pure twin serves
        from agent.authn._jsonobj_py import strict_json_object
else:
    from agent.authn._jsonobj_py import strict_json_object

__all__ = ["strict_json_object"]
