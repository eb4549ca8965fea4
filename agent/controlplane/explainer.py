"""The console's "why was this denied": one request decided against a service's current published policy.

Exactly `authz-agent check` (agent.explain), with what an agent of the service would have: the policy of the
bundle published now, the revocations published now, and the identity providers' real keys, fetched as the agent
fetches them and kept per service (a provider configured as before keeps its keys across versions). A fetch that
fails is the first line of the explanation, and the decision then says what the agent would do without keys.

What an operator pastes (headers, a token) lives only for the request: the engine is made per explanation (no
token cache, no remembered allow outlives it), nothing is logged, and the token is cut out of anything shown.
Explanations are rate limited per user, since each can make the control plane fetch keys or introspect.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.authn.jwks import KeyStore
from agent.authn.revocation import RevocationSet
from agent.config import Policy, load_policy_text
from agent.config.model import IdentityProvider
from agent.controlplane._proto.authz.controlplane.v1 import policy_sync_pb2 as pb
from agent.decision import RequestView
from agent.engine import Engine
from agent.errors import ConfigErrors
from agent.explain import Explanation, explain, load_keys, parse_headers

if TYPE_CHECKING:
    from agent.controlplane.server import Publisher

MAX_METHOD = 16
MAX_PATH = 4096
MAX_HEADERS_TEXT = 16 * 1024
MAX_HEADER_LINES = 64
MAX_TOKEN = 16 * 1024
MAX_HOST = 255
PER_MINUTE = 10  # explanations per user per minute
MAX_USERS = 10_000  # users whose recent explanations are remembered (the oldest forgotten first)
HIDDEN = "[the token]"
# Headers whose values are credentials: cut out of anything shown, as the token field is (a proof, a signature,
# a session cookie pasted with the request must not come back in the page).
CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "dpop", "signature", "cookie", "x-api-key")


class ExplainRefused(ValueError):
    """The input cannot be explained as given (too large, malformed, no such service): said to the user."""


class RateLimited(ExplainRefused):
    pass


@dataclass(frozen=True)
class ExplainResult:
    service: str
    version: str
    lines: list[str]  # as `check` prints them, the token cut out
    summary: dict[str, object]
    allowed: bool


class Explainer:
    def __init__(self, publisher: Publisher, clock: Callable[[], float] = time.monotonic) -> None:
        self.publisher = publisher
        self._clock = clock
        self._policies: dict[str, tuple[str, Policy]] = {}  # service -> (version, its policy)
        self._stores: dict[str, dict[IdentityProvider, KeyStore]] = {}  # service -> its providers' keys
        self._recent: dict[str, deque[float]] = {}  # user -> when their last explanations were asked
        self._loading: dict[str, asyncio.Lock] = {}

    def services(self) -> list[str]:
        return sorted(self.publisher.published)

    def admit(self, user: str) -> None:
        """Count one explanation for `user`; RateLimited past PER_MINUTE in the last 60 s."""
        now = self._clock()
        recent = self._recent.pop(user, None) or deque()
        while recent and now - recent[0] >= 60:
            recent.popleft()
        self._recent[user] = recent  # re-inserted: the dict's order is the users' last use
        if len(recent) >= PER_MINUTE:
            raise RateLimited(
                f"at most {PER_MINUTE} explanations a minute; try again in {60 - (now - recent[0]):.0f} s"
            )
        recent.append(now)
        while len(self._recent) > MAX_USERS:
            del self._recent[next(iter(self._recent))]

    async def policy(self, service: str) -> tuple[str, Policy]:
        """The policy of the bundle published now for `service`, compiled once per version (in a worker thread)."""
        published = self.publisher.published.get(service)
        if published is None:
            raise ExplainRefused(f"no policy of service {service!r} is published")
        async with self._loading.setdefault(service, asyncio.Lock()):
            cached = self._policies.get(service)
            if cached is not None and cached[0] == published.version:
                return cached
            payload = pb.BundlePayload.FromString(published.bundle.payload)
            try:
                policy = await asyncio.to_thread(
                    load_policy_text, payload.policy_yaml, f"<{service} {published.version}>", self.publisher.directory
                )
            except ConfigErrors as e:  # published, so it loaded then: a key file gone since, say
                raise ExplainRefused(f"the published policy of {service} does not load here now: {e}") from None
            self._policies[service] = (published.version, policy)
            return published.version, policy

    def _stores_for(self, service: str, policy: Policy) -> dict[str, KeyStore]:
        """The providers' key stores, as `run` keeps them: one configured exactly as before keeps its keys."""
        kept = self._stores.get(service, {})
        mine: dict[IdentityProvider, KeyStore] = {}
        for idp in policy.identity_providers:
            if idp.jwks_uri or idp.jwks_file or idp.discovery:
                mine[idp] = kept.get(idp) or KeyStore(idp)
        for idp, store in kept.items():
            if idp not in mine:
                asyncio.get_running_loop().create_task(store.close())
        self._stores[service] = mine
        return {idp.name: store for idp, store in mine.items()}

    async def explain(
        self,
        service: str,
        method: str,
        path: str,
        headers_text: str = "",
        token: str = "",
        host: str = "",
        source: str = "127.0.0.1",
    ) -> ExplainResult:
        """Decide the request against `service`'s current policy; ExplainRefused says what is wrong with the input."""
        method = method.strip().upper()
        if not method or len(method) > MAX_METHOD:
            raise ExplainRefused(f"the method must be 1 to {MAX_METHOD} characters")
        if not path.startswith("/") or len(path) > MAX_PATH:
            raise ExplainRefused(f"the path must start with / and be at most {MAX_PATH} characters")
        if len(headers_text) > MAX_HEADERS_TEXT or headers_text.count("\n") >= MAX_HEADER_LINES:
            raise ExplainRefused(f"at most {MAX_HEADER_LINES} header lines, {MAX_HEADERS_TEXT} bytes")
        if len(token) > MAX_TOKEN or len(host) > MAX_HOST:
            raise ExplainRefused(f"the token may be at most {MAX_TOKEN} characters, the host {MAX_HOST}")
        try:
            source = str(ipaddress.ip_address(source.strip()))
        except ValueError:
            raise ExplainRefused("the caller's address must be an IP address, e.g. 10.1.2.3") from None
        try:
            headers = parse_headers(headers_text.splitlines())
        except ValueError as e:
            raise ExplainRefused(f"headers: {e}") from None
        token = token.strip()
        if token:
            scheme, _, rest = token.partition(" ")
            headers["authorization"] = token if rest and scheme.lower() in ("bearer", "dpop") else f"Bearer {token}"
        version, policy = await self.policy(service)
        stores = self._stores_for(service, policy)
        revocations = RevocationSet()
        r = self.publisher.revocations
        revocations.replace(r.sequence, r.jti, r.by_subject(), frozenset(r.clients))
        engine = Engine(policy, stores, token_cache_entries=0, revocations=revocations)
        view = RequestView(method=method, path=path, host=host.strip(), headers=headers, source=source)
        try:
            explained: Explanation = await explain(engine, view, await load_keys(_due(stores)))
        finally:
            if engine.introspector is not None:
                await engine.introspector.close()
        pasted = [headers.get(h, "") for h in CREDENTIAL_HEADERS]
        pasted += [v.partition(" ")[2] for v in pasted]  # a scheme's value alone ("Bearer X" -> "X")
        secrets = [s for s in (token, token.partition(" ")[2], *pasted) if len(s) >= 8]
        return ExplainResult(
            service,
            version,
            [_hide(line, secrets) for line in explained.lines()],
            _hide_all(explained.summary, secrets),
            explained.decision.allowed,
        )

    async def close(self) -> None:
        for stores in self._stores.values():
            for store in stores.values():
                await store.close()
        self._stores.clear()


def _due(stores: dict[str, KeyStore]) -> dict[str, KeyStore]:
    """The stores to fetch before deciding: keys never loaded, or older than the provider's refresh_s (an agent's
    refresher would have renewed them). A kid they lack is refetched by the engine, as on an agent."""
    now = time.monotonic()  # the stores' own clock
    return {
        name: s
        for name, s in stores.items()
        if not s.ready or s.fetched_at is None or now - s.fetched_at >= s.idp.refresh_s
    }


def _hide(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, HIDDEN)
    return text


def _hide_all(value: object, secrets: list[str]) -> dict[str, object]:
    def walk(v: object) -> object:
        if isinstance(v, str):
            return _hide(v, secrets)
        if isinstance(v, dict):
            return {walk(k): walk(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [walk(x) for x in v]
        return v

    out = walk(value)
    assert isinstance(out, dict)
    return out
