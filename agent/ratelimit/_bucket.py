"""Token-bucket tables: the Cython module when built, else the pure twin (AGENT_NO_EXTENSIONS=1)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the twins have one API; the pure one is the type
    from agent.ratelimit._bucket_py import BucketTable
elif not os.environ.get("AGENT_NO_EXTENSIONS"):
    try:
        from agent._bucket_c import BucketTable
    except ImportError:  # not built here: the pure twin serves
        from agent.ratelimit._bucket_py import BucketTable
else:
    from agent.ratelimit._bucket_py import BucketTable

__all__ = ["BucketTable"]
