"""Revoked credentials (from the control plane): by `jti`, every token of a subject issued before a time, and
every credential of a client (a token naming it as its client id, and the HMAC client of that name)."""

from __future__ import annotations

from agent import reasons as R
from agent.authn.principal import Principal

# The claims that name a token's client (RFC 9068 client_id, OIDC azp), besides the one the policy maps: a revoked
# client stays refused whichever of them its tokens carry.
CLIENT_CLAIMS = ("client_id", "azp")


class RevocationSet:
    """The revocations in force. `replace` swaps them whole (one assignment), so a check never sees half
    of an update; the server shares one set with every engine it builds, across policy reloads."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        # What is in force, as one object: a new one on every `replace` (agent._recall compares identity). Read-only.
        self.state: tuple[int, frozenset[str], dict[tuple[str, str], int], frozenset[tuple[str, str]]] = (
            0,
            frozenset(),
            {},
            frozenset(),
        )

    @property
    def sequence(self) -> int:
        return self.state[0]

    def replace(
        self,
        sequence: int,
        jti: frozenset[str],
        subjects: dict[tuple[str, str], int],
        clients: frozenset[tuple[str, str]] = frozenset(),
    ) -> None:
        """`clients` holds (issuer, client_id) pairs; issuer "" revokes the client id whatever the issuer."""
        self.state = (sequence, jti, dict(subjects), frozenset(clients))

    def revoked(self, who: Principal) -> bool:
        return self.reason(who) is not None

    def reason(self, who: Principal) -> str | None:
        """Why `who` is refused (token_revoked or client_revoked), or None when nothing revokes it."""
        _, jti, subjects, clients = self.state
        if who.jti is not None and who.jti in jti:
            return R.TOKEN_REVOKED
        if subjects:
            before = subjects.get((who.issuer, who.subject))
            if before is not None:
                iat = who.claims.get("iat")
                # Without an issue time the token cannot show it is newer than the revocation.
                if not isinstance(iat, int | float) or isinstance(iat, bool) or iat < before:
                    return R.TOKEN_REVOKED
        if clients and self._client_revoked(who, clients):
            return R.CLIENT_REVOKED
        return None

    @staticmethod
    def _client_revoked(who: Principal, clients: frozenset[tuple[str, str]]) -> bool:
        names = {who.client_id} if who.client_id is not None else set()
        if who.method != "hmac":
            names.update(v for k in CLIENT_CLAIMS if isinstance(v := who.claims.get(k), str))
        return any((who.issuer, n) in clients or ("", n) in clients for n in names)
