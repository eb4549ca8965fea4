"""The load generator of `authz-agent bench`: the Cython one when built (libnghttp2, its loop without the GIL),
else the pure twin (h2; AGENT_NO_EXTENSIONS=1 forces it). NATIVE says which serves (the bench reports it)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from agent._loadgen_py import MAX_HEADERS, MAX_MESSAGE, Item

if TYPE_CHECKING:  # the twins have one API; the pure one is the type
    from agent._loadgen_py import Load

    NATIVE: bool
elif not os.environ.get("AGENT_NO_EXTENSIONS"):
    try:
        from agent._loadgen_c import Load

        NATIVE = True
    except ImportError:  # not built here: the pure twin serves
        from agent._loadgen_py import Load

        NATIVE = False
else:
    from agent._loadgen_py import Load

    NATIVE = False

__all__ = ["MAX_HEADERS", "MAX_MESSAGE", "NATIVE", "Item", "Load"]
