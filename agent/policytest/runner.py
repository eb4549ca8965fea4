"""Runs a policy's test cases through the engine `run` uses, with throwaway credentials and no network.

Each case gets a fresh Engine (its own rate-limit buckets, replay and token caches), so no case depends on
another's order. The identity providers' key stores hold the run's throwaway public keys and never fetch; a
provider that only introspects opaque tokens is answered, for the tokens this run minted, from the case's
claims. Everything else — routing, every verifier, deny rules, alternatives, rate limits, the responses — is the
production path, so a passing case means the same answer in production.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.authn.introspection import Introspector
from agent.authn.jwk import KeySet
from agent.authn.jwks import KeyStore
from agent.config import load_policy
from agent.config.model import IdentityProvider, Policy
from agent.decision import Decision, RequestView
from agent.engine import OVERRIDE_HEADERS, Engine
from agent.envoyconf import CLIENT_FORWARDING_HEADERS, needs
from agent.errors import ConfigError, ConfigErrors
from agent.policytest.cases import Case, TestFile, TokenSpec, read_test_file
from agent.policytest.credentials import PREFERENCE, ClientCertificate, DpopClient, Keys, content_digest, sign_request

DEFAULT_TOKEN_LIFETIME_S = 300.0
# Header values never shown in a result, whoever wrote them: credentials the runner made or the file carries.
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "dpop", "signature", "signature-input", "cookie", "set-cookie"}
)


# Header names that carry secrets by convention (x-api-key, x-auth-token, x-client-secret): never shown either.
SECRET_WORDS = ("key", "token", "secret", "passw", "session", "credential", "signature", "cookie")
Minted = tuple[str, "DpopClient | None", "ClientCertificate | None"]  # a token, its DPoP key, its certificate


class FixedKeys(KeyStore):
    """A provider's key store holding the run's throwaway public keys: its real key source (a JWKS URL,
    discovery, a file) is never fetched or read. A token with a kid it lacks stays unknown."""

    def __init__(self, idp: IdentityProvider, keys: KeySet) -> None:
        super().__init__(idp)
        self.keys = keys
        self.fetched_at = self._clock()

    async def _fetch_once(self) -> bool:
        self.fetch_count += 1
        self.last_error = "policy test: only the runner's throwaway keys"
        return False


class AnsweringIntrospector(Introspector):
    """The introspection endpoint of a provider that issues opaque tokens, answered from the tokens this run
    minted (their claims, `active: true`); any other token is inactive. Nothing is sent anywhere."""

    def __init__(self, idp: IdentityProvider, clock: Callable[[], float], answers: dict[str, dict[str, Any]]) -> None:
        super().__init__(idp, clock)
        self.answers = answers

    async def _fetch(self, token: str) -> dict[str, Any]:
        return self.answers.get(token, {"active": False})


@dataclass
class CaseResult:
    name: str
    line: int
    ok: bool
    problems: list[str]  # one line per expectation not met: "status: expected 401, got 200"
    trace: list[str]  # the engine's steps, as `check` prints them
    status: int
    reason: str
    route: str | None
    seconds: float = 0.0
    decisions: list[Decision] = field(default_factory=list, repr=False)  # every request's (`repeat`), last held


@dataclass
class FileResult:
    path: str
    cases: list[CaseResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "file:line: message": the file could not be run
    notes: list[str] = field(default_factory=list)  # stand-ins used (a throwaway key for an unreadable key file)
    uncovered: list[str] = field(default_factory=list)  # "route billing-webhook alternative 1"
    policy_version: str = ""
    require_coverage: bool = False

    @property
    def passed(self) -> int:
        return sum(c.ok for c in self.cases)

    @property
    def failed(self) -> int:
        return sum(not c.ok for c in self.cases)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.failed and not (self.require_coverage and self.uncovered)

    def summary(self) -> str:
        if self.errors:
            return "the test file or its policy has errors; no case was run"
        text = f"{self.passed} passed, {self.failed} failed"
        if self.uncovered:
            text += f", {len(self.uncovered)} not covered"
        return text


def run_file(
    path: str | Path,
    policy: Policy | None = None,
    *,
    require_coverage: bool = False,
    budget_s: float | None = None,
    stop: threading.Event | None = None,
    explain: bool = False,
) -> FileResult:
    """Run one test file. Synchronous, with its own event loop: call it from a worker thread when a loop runs.

    With `policy` (the control plane's candidate) the cases run against it, and the file's `policy:` must be the
    same file; without it, the file's policy is loaded with throwaway stand-ins for secrets it cannot read.
    `budget_s` bounds the run: cases not decided within it make the file an error (a control plane must not be
    held by a test file); `stop`, once set, does the same before the next case (a control plane shutting down).
    `explain`: every case's decision trace, passing ones too (failing ones always have theirs)."""
    return asyncio.run(
        run_file_async(
            Path(path), policy, require_coverage=require_coverage, budget_s=budget_s, stop=stop, explain=explain
        )
    )


async def run_file_async(
    path: Path,
    policy: Policy | None = None,
    *,
    require_coverage: bool = False,
    budget_s: float | None = None,
    stop: threading.Event | None = None,
    explain: bool = False,
) -> FileResult:
    started_run = time.monotonic()
    result = FileResult(str(path), require_coverage=require_coverage)
    try:
        tests = read_test_file(path)
    except ConfigErrors as e:
        result.errors = [str(err) for err in e.errors]
        return result
    if policy is None:
        try:
            policy = load_policy(tests.policy_path, stand_ins=True)
        except ConfigErrors as e:
            result.errors = [f"{path}: its policy {str(tests.policy_path)!r} is not valid:"] + [
                str(x) for x in e.errors
            ]
            return result
        result.notes.extend(policy.stood_in)
    elif tests.policy_path.resolve() != Path(policy.source).resolve():
        result.errors = [f"{path}:1: these cases test {str(tests.policy_path)!r}, not {policy.source!r}"]
        return result
    result.policy_version = policy.version
    result.errors = [str(e) for e in _cross_check(tests, policy)]
    if result.errors:
        return result
    run = Run(policy)
    if policy.shared_state is not None:
        result.notes.append("shared_state (Redis) is not used: quotas and replay caches are each case's own")
    result.notes.extend(policy.warning_lines())
    for case in tests.cases:
        if budget_s is not None and time.monotonic() - started_run > budget_s:
            result.errors = [f"{path}: the cases took longer than {budget_s:g} s; {len(result.cases)} of "
                             f"{len(tests.cases)} were run"]  # fmt: skip
            result.cases = []
            return result
        if stop is not None and stop.is_set():
            result.errors = [f"{path}: stopped after {len(result.cases)} of {len(tests.cases)} cases"]
            result.cases = []
            return result
        started = time.perf_counter()
        case_result = await run.case(case, case.at or tests.at, explain)
        case_result.seconds = time.perf_counter() - started
        result.cases.append(case_result)
    result.notes.extend(sorted(run.notes))
    result.uncovered = uncovered(policy, [d for c in result.cases for d in c.decisions])
    return result


def _cross_check(tests: TestFile, policy: Policy) -> list[ConfigError]:
    """Names in the cases that the policy must know: providers, HMAC clients, routes."""
    file = str(tests.path)
    errors: list[ConfigError] = []
    providers = {i.name: i for i in policy.identity_providers}
    clients = {c.name for c in policy.hmac_clients}
    routes = {r.name for r in policy.routes}
    for case in tests.cases:
        t = case.token
        if t is not None:
            if t.provider is not None and t.provider not in providers:
                known = ", ".join(sorted(providers)) or "none"
                errors.append(ConfigError(f"case {case.name!r}: no identity provider {t.provider!r} (known: {known})",
                                          file, case.lines["provider"]))  # fmt: skip
            elif t.provider is None and len(providers) != 1:
                why = "has none" if not providers else f"has {len(providers)}: {', '.join(sorted(providers))}"
                errors.append(ConfigError(f"case {case.name!r}: name the token's provider (the policy {why})",
                                          file, t.line))  # fmt: skip
        if case.signed_by is not None and case.signed_by not in clients:
            known = ", ".join(sorted(clients)) or "none"
            errors.append(ConfigError(f"case {case.name!r}: no hmac client {case.signed_by!r} (known: {known})",
                                      file, case.lines["signed_by"]))  # fmt: skip
        route = case.expect.route
        if case.expect.checks_route and route is not None and route not in routes:
            errors.append(ConfigError(f"case {case.name!r}: the policy has no route {route!r}", file,
                                      case.lines["route"]))  # fmt: skip
    return errors


class Run:
    """What the cases of one file share: the policy, the throwaway keys and the stand-in key stores."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.keys = Keys()
        self.bodies, _ = needs(policy)  # whether envoy-config has Envoy send request bodies (signed routes)
        self.notes: set[str] = set()
        self._key_sets: dict[str, KeySet] = {}

    def stores(self) -> dict[str, KeyStore]:
        stores: dict[str, KeyStore] = {}
        for idp in self.policy.identity_providers:
            if idp.jwks_uri or idp.jwks_file or idp.discovery:
                keys = self._key_sets.get(idp.name)
                if keys is None:
                    keys = self._key_sets[idp.name] = self.keys.key_set(idp.algorithms)
                stores[idp.name] = FixedKeys(idp, keys)
        return stores

    async def case(self, case: Case, at: datetime | None, explain: bool = False) -> CaseResult:
        """Decide the case's request (`repeat` times, the same caller with a fresh proof or signature each time)
        on a fresh engine, as `run` decides (its remembered allows included); the last decision is held against
        `expect`, every one counts for coverage. A failing case (or every case, with `explain`) is decided again
        on another fresh engine with the trace `check` prints; should that answer differ, it is a problem too."""
        try:
            decisions, view, _ = await self._decide(case, at, traced=False)
            decision = decisions[-1]
            problems = compare(case, view, decision)
            trace: list[str] = []
            if problems or explain:
                again, _, trace = await self._decide(case, at, traced=True)
                if _answer(again[-1]) != _answer(decision):
                    problems.append(f"explained again, the engine answered {_answer(again[-1])}, not "
                                    f"{_answer(decision)}: its remembered-allow path disagrees (a bug)")  # fmt: skip
        except (ValueError, OverflowError) as e:  # OverflowError: a certificate's dates near year 1 or 9999
            return CaseResult(case.name, case.line, False, [f"cannot make the request: {e}"], [], 0, "", None)
        except Exception as e:  # noqa: BLE001 - one case's failure is reported, never the end of the run
            # Only the type: the text could quote what the case carries.
            return CaseResult(case.name, case.line, False, [f"the case could not be run: {type(e).__name__}"],
                              [], 0, "", None)  # fmt: skip
        return CaseResult(case.name, case.line, not problems, problems, trace, decision.status, decision.reason,
                          decision.route, decisions=decisions)  # fmt: skip

    async def _decide(
        self, case: Case, at: datetime | None, traced: bool
    ) -> tuple[list[Decision], RequestView, list[str]]:
        """The decisions of the case's requests on a fresh engine, the last request, and its trace (if traced)."""
        clock = _clock(at.timestamp() if at is not None else None)
        engine = Engine(self.policy, self.stores(), clock=clock)
        answers: dict[str, dict[str, Any]] = {}
        if engine.introspector is not None:
            engine.introspector = AnsweringIntrospector(engine.introspector.idp, clock, answers)
        decisions: list[Decision] = []
        trace: list[str] = []
        try:
            minted = self.mint(case.token, clock(), answers) if case.token is not None else None
            for _ in range(case.repeat):
                view = self.request(case, engine, clock(), minted)
                trace = []
                decisions.append(await engine.check(view, trace if traced else None))
        finally:
            await engine.close()
        return decisions, view, trace

    def client_request(self, case: Case, engine: Engine, now: float, minted: Minted | None) -> ClientRequest:
        """The request the case's client sends: its headers with the credentials the case describes (the token,
        a fresh DPoP proof for this request, a signature with a fresh nonce)."""
        headers = dict(case.headers)
        host = case.host or self.policy.service
        certificate = ""
        if case.body and "content-length" not in headers:
            headers["content-length"] = str(len(case.body))
        if case.token is not None and minted is not None:
            token, dpop, cert = minted
            scheme = case.token.scheme or ("DPoP" if dpop is not None else "Bearer")
            headers["authorization"] = f"{scheme} {token}"
            if dpop is not None:
                htu = f"{case.scheme}://{host}{case.path.split('?', 1)[0]}"
                nonce = engine.dpop.nonces.issue() if self.policy.dpop.use_nonce else None
                headers["dpop"] = dpop.proof(case.method, htu, token, now, nonce)
            if cert is not None:
                certificate = cert.url_encoded_pem
        if case.signed_by is not None:
            client = next(c for c in self.policy.hmac_clients if c.name == case.signed_by)
            components = list(client.components)
            if case.body or "content-digest" in components:
                headers.setdefault("content-digest", content_digest(case.body))
                if "content-digest" not in components:
                    components.append("content-digest")
            missing = [c for c in components if not c.startswith("@") and c not in headers]
            if missing:
                raise ValueError(f"hmac client {client.name} signs {', '.join(missing)}: give it in request.headers")
            headers.update(sign_request(client.keys[0], client.name, tuple(components), case.method, case.scheme,
                                        host, case.path, headers, int(now)))  # fmt: skip
        return ClientRequest(case.method, case.path, host, case.scheme, case.source, headers, case.body, certificate)

    def request(self, case: Case, engine: Engine, now: float, minted: Minted | None) -> RequestView:
        """The request as Envoy, set up by `envoy-config --policy`, hands it to the agent."""
        return self.client_request(case, engine, now, minted).delivered(self.bodies)

    def mint(self, spec: TokenSpec, now: float, answers: dict[str, dict[str, Any]]) -> Minted:
        policy = self.policy
        idp = next(i for i in policy.identity_providers if spec.provider in (None, i.name))
        lifetime = spec.expires_in if spec.expires_in is not None else min(DEFAULT_TOKEN_LIFETIME_S,
                                                                            idp.max_token_lifetime_s)  # fmt: skip
        claims: dict[str, Any] = {
            "iss": idp.issuer,
            "aud": sorted(idp.audiences)[0],
            "iat": int(now),
            "exp": int(now + lifetime),
            "jti": secrets.token_urlsafe(12),
        }
        claims.update(spec.claims)
        claims = {k: v for k, v in claims.items() if v is not None}
        dpop = DpopClient(self.keys, policy.dpop.algorithms) if spec.dpop else None
        cert = ClientCertificate(now) if spec.mtls else None
        if dpop is not None or cert is not None:
            claims["cnf"] = {"jkt": dpop.jkt} if dpop is not None else {}
            if cert is not None:
                claims["cnf"]["x5t#S256"] = cert.x5t
        if not (idp.jwks_uri or idp.jwks_file or idp.discovery):
            # Only introspection: an opaque token, which the stand-in endpoint answers with these claims.
            token = secrets.token_urlsafe(32)
            answers[token] = {"active": True, **claims}
            self.notes.add(f"identity provider {idp.name}: opaque tokens, answered from each case's claims")
            return token, dpop, cert
        alg = spec.alg or next((a for a in PREFERENCE if a in idp.algorithms), "ES256")
        typ = "at+jwt" if "at+jwt" in idp.token_types else sorted(idp.token_types)[0]
        return self.keys.jws({"typ": typ}, claims, alg), dpop, cert


@dataclass(slots=True)
class ClientRequest:
    """A request as the client sends it to Envoy."""

    method: str
    path: str
    host: str
    scheme: str
    source: str
    headers: dict[str, str]
    body: bytes
    certificate: str  # the client certificate Envoy verified (URL-encoded PEM), or ""

    def delivered(self, bodies: bool) -> RequestView:
        """What Envoy passes the agent; the body only when it sends bodies (envoy-config does for signed routes)."""
        headers = delivered(self.headers, self.method, self.path, self.host, self.scheme, self.source)
        body = self.body if bodies else b""
        if body:  # with_request_body marks whether it cut the body (never: a case's body fits what it buffers)
            headers["x-envoy-auth-partial-body"] = "false"
        return RequestView(self.method, self.path, self.host, headers, self.source, self.scheme, body, self.certificate)


def delivered(headers: dict[str, str], method: str, path: str, host: str, scheme: str, source: str) -> dict[str, str]:
    """The headers Envoy (`envoy-config`: use_remote_address, no trusted hops) passes in the CheckRequest: the
    client's, with the pseudo-headers, the client's address appended to X-Forwarded-For and in
    X-Envoy-External-Address, X-Forwarded-Proto set to the scheme and a fresh X-Request-Id (a client's own is
    replaced). Seen from a real Envoy: tests/e2e/test_policy_test_fidelity_e2e.py."""
    out = {":authority": host, ":method": method, ":path": path, ":scheme": scheme, **headers}
    xff = headers.get("x-forwarded-for")
    out["x-forwarded-for"] = f"{xff},{source}" if xff else source
    out["x-forwarded-proto"] = scheme
    out["x-request-id"] = str(uuid.uuid4())
    out["x-envoy-external-address"] = source
    return out


def upstream(view: RequestView, d: Decision) -> dict[str, str]:
    """What the app receives when the request is allowed: the headers Envoy passed the agent, less those the
    agent removes, with those it sets; then Envoy's own route changes (envoy-config): the method and path
    override headers and a client's forwarding claims removed, X-Forwarded-For set to the client's address."""
    removed = {h.lower() for h in d.remove_headers} | OVERRIDE_HEADERS | set(CLIENT_FORWARDING_HEADERS)
    out = {k: v for k, v in view.headers.items() if not k.startswith(":") and k not in removed}
    out.update(_joined(d.upstream_headers))
    out["x-forwarded-for"] = view.source
    return out


def _answer(d: Decision) -> str:
    return f"{d.status} {d.reason}" + (f", route {d.route}" if d.route else "")


def _clock(frozen: float | None) -> Callable[[], float]:
    """The case's clock: frozen at its `at` (or the file's), else the real one."""
    if frozen is None:
        return time.time
    return lambda: frozen


def _shown(name: str, value: str | None) -> str:
    if value is None:
        return "absent"
    if name in CREDENTIAL_HEADERS or any(word in name for word in SECRET_WORDS):
        return "(a credential, not shown)"
    return repr(value)


def _header_problems(what: str, expected: dict[str, str | None], got: dict[str, str]) -> list[str]:
    out = []
    for name, want in expected.items():
        have = got.get(name)
        if want != have:
            out.append(f"{what} {name}: expected {_shown(name, want)}, got {_shown(name, have)}")
    return out


def _joined(pairs: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in pairs:
        n = name.lower()
        out[n] = f"{out[n]}, {value}" if n in out else value
    return out


def compare(case: Case, view: RequestView, d: Decision) -> list[str]:
    """What the decision got wrong against the case's `expect`, one line each (empty: the case passes)."""
    e = case.expect
    problems = []
    if e.status is not None and e.status != d.status:
        problems.append(f"status: expected {e.status}, got {d.status}")
    if e.reason is not None and e.reason != d.reason:
        problems.append(f"reason: expected {e.reason}, got {d.reason}")
    if e.checks_route and e.route != d.route:
        problems.append(f"route: expected {e.route or 'no route'}, got {d.route or 'no route'}")
    if e.upstream_headers is not None:
        if not d.allowed:
            problems.append(
                f"upstream_headers: the request was refused ({d.status} {d.reason}); nothing reached the upstream"
            )
        else:
            problems += _header_problems("upstream header", e.upstream_headers, upstream(view, d))
    if e.headers is not None:
        problems += _header_problems("response header", e.headers, _joined(d.response_headers))
    return problems


def uncovered(policy: Policy, decisions: list[Decision]) -> list[str]:
    """Routes no case reached, alternatives that let no case pass, deny rules that refused no case (a rule is
    known by its name and line: a route's rule and a top-level one may share a name)."""
    routes = {d.route for d in decisions}
    allowed_by = {(d.route, d.allow_index) for d in decisions if d.allowed and d.allow_index is not None}
    refused_by = {(d.deny_rule, d.deny_line) for d in decisions if d.deny_rule is not None}
    out = []
    for r in policy.routes:
        if r.name not in routes:
            out.append(f"route {r.name} (line {r.line})")
            continue
        for i, alt in enumerate(r.allow):
            if (r.name, i) not in allowed_by:
                out.append(f"route {r.name} alternative {i} (line {alt.line})")
        out += [
            f"route {r.name} deny rule {x.name} (line {x.line})" for x in r.deny if (x.name, x.line) not in refused_by
        ]
    out += [f"deny rule {x.name} (line {x.line})" for x in policy.deny if (x.name, x.line) not in refused_by]
    return out
