"""The remembered-allow table that answers repeated requests from wire bytes: the Cython one when built, else the
pure twin (AGENT_NO_EXTENSIONS=1). Decision ids come from here too, one counter for every path, and the digest
that keys the verified-token cache (OpenSSL's one-shot SHA-256, no bytes made for an ASCII token)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the twins have one API; the pure one is the type
    from agent._recall_py import RecallTable, new_decision_id, recall_key, text_digest
elif not os.environ.get("AGENT_NO_EXTENSIONS"):
    try:
        from agent._recall_c import RecallTable, new_decision_id, recall_key, text_digest
    except ImportError:  # not built here: the pure twin serves
        from agent._recall_py import RecallTable, new_decision_id, recall_key, text_digest
else:
    from agent._recall_py import RecallTable, new_decision_id, recall_key, text_digest

__all__ = ["RecallTable", "new_decision_id", "recall_key", "text_digest"]
