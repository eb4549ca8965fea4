"""Policy files: loading, validation with file:line errors, and the frozen model the engine reads."""

from agent.config.loader import load_policy, load_policy_text
from agent.config.model import Allow, ClaimNames, ClaimRule, IdentityProvider, Introspection, Policy, Route

__all__ = [
    "Allow",
    "ClaimNames",
    "ClaimRule",
    "IdentityProvider",
    "Introspection",
    "Policy",
    "Route",
    "load_policy",
    "load_policy_text",
]
