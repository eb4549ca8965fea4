"""The one exception root of the project and its leaves, each carrying the data a caller needs."""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(AgentError, ValueError):
    """A policy file is wrong; names the file, the line and how to fix it."""

    def __init__(self, message: str, file: str = "<policy>", line: int = 0, column: int = 0) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.column = column  # 1-based, when the problem is inside a value (a CEL expression); 0 otherwise
        where = f"{file}:{line}:{column}" if line and column else f"{file}:{line}" if line else file
        super().__init__(f"{where}: {message}")


class ConfigErrors(AgentError, ValueError):
    """Several ConfigErrors found in one pass, so a service owner fixes them all at once."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class AuthnError(AgentError):
    """A credential was refused; `reason` is a stable reason code from agent.reasons."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        # detail is for the operator's trace only: never token material, never echoed to the caller.
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class KeySourceError(AgentError):
    """A JWKS / discovery / introspection endpoint answered badly or not at all."""


class WireError(AgentError, ValueError):
    """Bytes that are not a CheckRequest the decoder can read."""
