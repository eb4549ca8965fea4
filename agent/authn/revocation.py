"""Revoked tokens (from the control plane): by `jti`, and every token of a subject issued before a time."""

from __future__ import annotations

from agent.authn.principal import Principal


class RevocationSet:
    """The revocations in force. `replace` swaps them whole (one assignment), so a check never sees half
    of an update; the server shares one set with every engine it builds, across policy reloads."""

    __slots__ = ("_state",)

    def __init__(self) -> None:
        self._state: tuple[int, frozenset[str], dict[tuple[str, str], int]] = (0, frozenset(), {})

    @property
    def sequence(self) -> int:
        return self._state[0]

    @property
    def state(self) -> object:
        """What is in force now, as one object: a new one on every `replace` (agent._recall compares identity)."""
        return self._state

    def replace(self, sequence: int, jti: frozenset[str], subjects: dict[tuple[str, str], int]) -> None:
        self._state = (sequence, jti, dict(subjects))

    def revoked(self, who: Principal) -> bool:
        _, jti, subjects = self._state
        if who.jti is not None and who.jti in jti:
            return True
        if subjects:
            before = subjects.get((who.issuer, who.subject))
            if before is not None:
                iat = who.claims.get("iat")
                # Without an issue time the token cannot show it is newer than the revocation.
                return not isinstance(iat, int | float) or isinstance(iat, bool) or iat < before
        return False
