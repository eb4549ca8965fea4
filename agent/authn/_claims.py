"""A JWT verified: the Cython checks when built, else the pure twin (AGENT_NO_EXTENSIONS=1)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the twins have one API; the pure one is the type
    from agent.authn._claims_py import (
        check_audience,
        check_auth_time,
        check_claims,
        check_header,
        principal_from_claims,
        split_token,
        time_claim,
        verify_signature,
        verify_token,
    )
elif not os.environ.get("AGENT_NO_EXTENSIONS"):
    try:
        from agent._claims_c import (
            check_audience,
            check_auth_time,
            check_claims,
            check_header,
            principal_from_claims,
            split_token,
            time_claim,
            verify_signature,
            verify_token,
        )
    except ImportError:  # not built here: the pure twin serves
        from agent.authn._claims_py import *  # noqa: F403
else:
    from agent.authn._claims_py import *  # noqa: F403

__all__ = [
    "check_audience",
    "check_auth_time",
    "check_claims",
    "check_header",
    "principal_from_claims",
    "split_token",
    "time_claim",
    "verify_signature",
    "verify_token",
]
