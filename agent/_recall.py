"""The remembered-allow table that answers repeated requests from wire bytes: the Cython one when built, else the
pure twin (AGENT_NO_EXTENSIONS=1). Decision ids come from here too, one counter for every path."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the twins have one API; the pure one is the type
    from agent._recall_py import RecallTable, new_decision_id, recall_key
elif not os.environ.get("AGENT_NO_EXTENSIONS"):
    try:
        from agent._recall_c import RecallTable, new_decision_id, recall_key
    except ImportError:  # not built here: the pure twin serves
        from agent._recall_py import RecallTable, new_decision_id, recall_key
else:
    from agent._recall_py import RecallTable, new_decision_id, recall_key

__all__ = ["RecallTable", "new_decision_id", "recall_key"]
