"""Revoked tokens (from the control plane): by `jti`, and every token of a subject issued before a time."""

from __future__ import annotations

from agent.authn.principal import Principal


class RevocationSet:
    """The revocations in force. `replace` swaps them whole (one assignment), so a check never sees half
    of an update; the server shares one set with every engine it builds, across policy reloads."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        # What is in force, as one object: a new one on every `replace` (agent._recall compares identity). Read-only.
        self.state: tuple[int, frozenset[str], dict[tuple[str, str], int]] = (0, frozenset(), {})

    @property
    def sequence(self) -> int:
        return self.state[0]

    def replace(self, sequence: int, jti: frozenset[str], subjects: dict[tuple[str, str], int]) -> None:
        self.state = (sequence, jti, dict(subjects))

    def revoked(self, who: Principal) -> bool:
        _, jti, subjects = self.state
        if who.jti is not None and who.jti in jti:
            return True
        if subjects:
            before = subjects.get((who.issuer, who.subject))
            if before is not None:
                iat = who.claims.get("iat")
                # Without an issue time the token cannot show it is newer than the revocation.
                return not isinstance(iat, int | float) or isinstance(iat, bool) or iat < before
        return False
