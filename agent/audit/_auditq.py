"""The audit record queue and JSON chain: the Cython module when built, else the pure twin (AGENT_NO_EXTENSIONS=1).

Only the Cython RecordQueue has capsule() (the C producers' entry): check hasattr(queue, "capsule").
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the twins have one API; the pure one is the type
    from agent.audit._auditq_py import JsonChain, RecordQueue
elif not os.environ.get("AGENT_NO_EXTENSIONS"):
    try:
        from agent._auditq_c import JsonChain, RecordQueue
    except ImportError:  # not built here: the pure twin serves
        from agent.audit._auditq_py import JsonChain, RecordQueue
else:
    from agent.audit._auditq_py import JsonChain, RecordQueue

__all__ = ["JsonChain", "RecordQueue"]
