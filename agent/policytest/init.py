"""`authz-agent policy test --init POLICY`: a starter test file, one allowed and one refused case per route.

The requests are derived from the policy (a path from the route's template, a token whose claims meet one
alternative, a signature by a client whose roles meet it), and every one is decided by the runner the file
will later run through: the expectations written are the decisions it got, so the file passes as written.
An alternative the generator cannot meet (a `when` over claims it cannot guess) is skipped for the next; when
none can be met, the case says so and expects what the policy decides today.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from agent import reasons as R
from agent.config import load_policy
from agent.config.model import Conditions, DenyRule, HmacClient, IdentityProvider, Policy, Route
from agent.policy.conditions import grant_active
from agent.policy.paths import GLOB, PARAM, parse_template
from agent.policytest.cases import DEFAULT_SOURCE, Case, Expect, TokenSpec, not_delivered
from agent.policytest.runner import CaseResult, Run

SUBJECT = "alice"
# Where a request without a network condition comes from: TEST-NET addresses first, then a private one, so that
# a deny rule blocking one of them (a blocklist written for tests) does not refuse every generated request.
SOURCES = (DEFAULT_SOURCE, "198.51.100.10", "203.0.113.10", "10.0.0.10", "2001:db8::10")
# A method a route does not take, for a public route's refused case (no_route).
OTHER_METHODS = ("DELETE", "PATCH", "POST", "PUT", "GET", "OPTIONS")
_WIDE = 1 << 30  # YAML lines are never folded


@dataclasses.dataclass
class _Planned:
    """One route's cases, each with the decision it got, and the comment lines written above them."""

    route: Route
    cases: list[tuple[Case, CaseResult]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def starter_file(policy_path: str) -> str:
    """The text of a starter `SERVICE.test.yaml` for the policy at `policy_path`, meant to sit beside it.

    Raises ConfigErrors when the policy is not valid. Secrets it cannot read (an HMAC key file) get throwaway
    stand-ins, as `policy test` gives them. Synchronous, with its own event loop."""
    path = Path(policy_path)
    policy = load_policy(path, stand_ins=True)
    now = datetime.now(UTC).replace(microsecond=0)
    plans = asyncio.run(_plan(policy, now))
    return _render(path.name, policy, now, plans)


async def _plan(policy: Policy, now: datetime) -> list[_Planned]:
    run = Run(policy)
    used: set[str] = set()
    plans = []
    for route in policy.routes:
        plan = _Planned(route)
        maker = _Maker(policy, route, now, run)
        if route.public:
            await maker.public(plan)
        else:
            await maker.guarded(plan)
        for i, (case, result) in enumerate(plan.cases):
            name, n = case.name, 2
            while name in used:
                name, n = f"{case.name} ({n})", n + 1
            used.add(name)
            plan.cases[i] = (dataclasses.replace(case, name=name), result)
        plans.append(plan)
    return plans


class _Maker:
    """Builds one route's candidate requests and decides them with the runner."""

    def __init__(self, policy: Policy, route: Route, now: datetime, run: Run) -> None:
        self.policy = policy
        self.route = route
        self.now = now
        self.run = run
        self.params = {s.value: f"{s.value}-1" for s in parse_template(route.path) if s.kind == PARAM}
        self.path = _fill(route.path, self.params)
        methods = route.methods
        self.method = "GET" if methods is None or "GET" in methods else sorted(methods)[0]
        self.deny_rules = (*policy.deny, *route.deny)

    async def decide(self, case: Case) -> CaseResult | None:
        result = await self.run.case(case, case.at or self.now)
        return result if result.decisions else None

    def request(self, name: str, alt: Conditions | None = None, **changes: Any) -> Case:
        """The route's request, from an address no deny rule blocks, meeting `alt`'s request conditions."""
        headers: dict[str, str] = {}
        at = None
        if alt is not None:
            for h in alt.headers:
                if h.equals is not None:
                    value = h.equals
                elif h.prefix is not None:
                    value = h.prefix + "example"
                elif h.present:
                    value = "1"
                else:
                    continue
                if not_delivered(h.name, value) is None:  # else no request meets it: Envoy removes the header
                    headers[h.name] = value
            if not grant_active(alt, self.now.timestamp()):
                at = alt.not_before or (alt.not_after - timedelta(minutes=1) if alt.not_after else None)
        case = Case(name=name, line=0, method=self.method, path=self.path, host=None, scheme="https",
                    source=self.source(alt), headers=headers, body=b"", expect=Expect(), at=at)  # fmt: skip
        return dataclasses.replace(case, **changes)

    def source(self, alt: Conditions | None) -> str:
        blocked = [n for rule in self.deny_rules for n in rule.conditions.source_cidrs]
        pool = [_first_host(n) for n in alt.source_cidrs] if alt is not None and alt.source_cidrs else SOURCES
        return next((a for a in pool if not any(ipaddress.ip_address(a) in n for n in blocked)), pool[0])

    async def public(self, plan: _Planned) -> None:
        allowed = self.request(f"{self.route.name} allowed")
        result = await self.decide(allowed)
        if result is None:
            return
        if result.status != 200:
            plan.notes.append("no allowed request was found: a deny rule refuses the generated request")
        plan.cases.append((allowed, result))
        for refused in self._public_refusals():
            got = await self.decide(refused)
            if got is not None and got.status != 200 and (got.route is None or got.reason == R.DENIED_BY_RULE):
                plan.cases.append((refused, got))
                return
        if result.status == 200:
            methods = "it takes every method" if self.route.methods is None else "other methods go to other routes"
            plan.notes.append(f"nothing refuses a request to this public route: {methods}, and no deny rule that "
                              "reads no credentials was found to refuse it")  # fmt: skip

    def _public_refusals(self) -> Iterator[Case]:
        methods = self.route.methods
        other = next((m for m in OTHER_METHODS if m not in methods), None) if methods is not None else None
        if other is not None:
            yield self.request(f"{self.route.name} refused for {other}", method=other)
        for rule in self.deny_rules:
            if not rule.conditions.credentials:
                yield self._tripping(rule)

    def _tripping(self, rule: DenyRule) -> Case:
        """A request meeting a deny rule's request conditions (its `when`, if any, is left to chance)."""
        c = rule.conditions
        case = self.request(f"{self.route.name} refused by deny rule {rule.name}", c)
        if c.source_cidrs:
            case = dataclasses.replace(case, source=_first_host(c.source_cidrs[0]))
        return case

    async def guarded(self, plan: _Planned) -> None:
        route = self.route
        tried: list[tuple[Case, CaseResult]] = []
        found: tuple[int, Case, CaseResult] | None = None
        for i, case in self._candidates():
            result = await self.decide(case)
            if result is None:
                continue
            tried.append((case, result))
            if result.status == 200 and result.route == route.name:
                found = (i, case, result)
                break
        if found is None:
            if tried:
                plan.notes.append("no allowed request was found: no alternative could be met by a generated "
                                  "request (a `when` it cannot satisfy?); this case expects what the policy decides "
                                  "today: write the request that should pass")  # fmt: skip
                case, result = tried[0]
                plan.cases.append((dataclasses.replace(case, name=f"{route.name} (no allowed request found)"), result))
        else:
            i, case, result = found
            if i:
                skipped = ", ".join(f"{j} (line {route.allow[j].line})" for j in range(i))
                plan.notes.append(f"not met by the generated request: alternative{'s' if i > 1 else ''} {skipped}")
            plan.cases.append((case, result))
            for refused in self._refusals(i, case):
                got = await self.decide(refused)
                if got is not None and got.status != 200:
                    plan.cases.append((refused, got))
                    return
        bare = self.request(f"{route.name} refused without credentials")
        got = await self.decide(bare)
        if got is not None:
            plan.cases.append((bare, got))

    def _candidates(self) -> Iterator[tuple[int, Case]]:
        """A request per alternative and credential kind; when none can be made (no HMAC client has the roles
        any alternative needs), one signed by the first client anyway, to show what the policy decides."""
        made = False
        for i, alt in enumerate(self.route.allow):
            for case in self._credentialed(i, alt):
                made = True
                yield i, case
        if not made and "hmac" in self.route.authn and self.policy.hmac_clients:
            base = self.request(f"{self.route.name} allowed", self.route.allow[0] if self.route.allow else None)
            yield 0, self.signed(base, self.policy.hmac_clients[0])

    def _credentialed(self, i: int, alt: Conditions) -> Iterator[Case]:
        """Requests meeting alternative `i`: with a token when the route takes them, then with a signature."""
        name = f"{self.route.name} allowed" + (f" (alternative {i})" if len(self.route.allow) > 1 else "")
        base = self.request(name, alt)
        if "jwt" in self.route.authn:
            idp = self.provider()
            if idp is not None:
                at = (base.at or self.now).timestamp()
                yield dataclasses.replace(base, token=self.token(idp, self.claims(idp, alt, at)))
        if "hmac" in self.route.authn:
            for client in self.policy.hmac_clients:
                if _fits(client, alt) and not alt.claims and not alt.acr_any and alt.max_auth_age_s is None:
                    yield self.signed(base, client)
                    break

    def _refusals(self, i: int, allowed: Case) -> Iterator[Case]:
        """The allowed request less what gave it permission (a token without the scopes, roles and claims the
        alternative reads; a signature by a client without its roles), when the alternative reads credentials."""
        alt = self.route.allow[i]
        route = self.route.name
        t = allowed.token
        if t is not None and alt.credentials:
            assert t.provider is not None
            idp = next(p for p in self.policy.identity_providers if p.name == t.provider)
            claims, lacking = _stripped(idp, alt, t.claims)
            if lacking:
                token = dataclasses.replace(t, claims=claims)
                yield dataclasses.replace(allowed, name=f"{route} refused without the {lacking}", token=token)
        if allowed.signed_by is not None and (alt.roles_all or alt.roles_any or alt.scopes_all or alt.scopes_any):
            for client in self.policy.hmac_clients:
                if not _fits(client, alt):
                    yield self.signed(allowed, client, f"{route} refused for client {client.name}")

    def provider(self) -> IdentityProvider | None:
        """The route's provider: the first it takes that has keys (tokens the runner signs), else the first."""
        ps = [
            p for p in self.policy.identity_providers if self.route.providers is None or p.name in self.route.providers
        ]
        return next((p for p in ps if p.jwks_uri or p.jwks_file or p.discovery), ps[0] if ps else None)

    def claims(self, idp: IdentityProvider, alt: Conditions, at: float) -> dict[str, Any]:
        """Claims meeting the alternative's credential conditions, at the names the provider puts them."""
        names = idp.claims
        claims: dict[str, Any] = {}
        _put(claims, names.subject_path, SUBJECT)
        scopes = sorted(alt.scopes_all)
        if alt.scopes_any and alt.scopes_any.isdisjoint(scopes):
            scopes.append(sorted(alt.scopes_any)[0])
        if scopes:
            _put(claims, names.scopes_path, " ".join(scopes))
        roles = sorted(alt.roles_all)
        if alt.roles_any and alt.roles_any.isdisjoint(roles):
            roles.append(sorted(alt.roles_any)[0])
        if roles:
            _put(claims, names.roles_path, roles)
        for rule in alt.claims:
            _put(claims, rule.path, self.params[rule.param] if rule.param is not None else rule.literal)
        if alt.acr_any:
            claims["acr"] = alt.acr_any[0]
        if alt.max_auth_age_s is not None:
            claims["auth_time"] = int(at - min(60.0, alt.max_auth_age_s / 2))
        return claims

    def token(self, idp: IdentityProvider, claims: dict[str, Any]) -> TokenSpec:
        return TokenSpec(provider=idp.name, claims=claims, dpop=self.route.bind == "dpop",
                         mtls=self.route.bind == "mtls")  # fmt: skip

    def signed(self, case: Case, client: HmacClient, name: str | None = None) -> Case:
        """The request signed by `client`, with a value for every header its signatures must cover."""
        headers = dict(case.headers)
        for c in client.components:
            if not c.startswith("@") and c != "content-digest":
                headers.setdefault(c, "example")
        return dataclasses.replace(case, name=name or case.name, signed_by=client.name, headers=headers, token=None)


def _fits(client: HmacClient, alt: Conditions) -> bool:
    """Whether an HMAC client's roles and scopes meet an alternative's."""
    return (
        alt.roles_all <= client.roles
        and (not alt.roles_any or not alt.roles_any.isdisjoint(client.roles))
        and alt.scopes_all <= client.scopes
        and (not alt.scopes_any or not alt.scopes_any.isdisjoint(client.scopes))
    )


def _stripped(idp: IdentityProvider, alt: Conditions, claims: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The claims less those meeting the alternative (claim rules get another value), and what was taken."""
    out: dict[str, Any] = _copy(claims)
    lacking = []
    if alt.scopes_all or alt.scopes_any:
        _drop(out, idp.claims.scopes_path)
        lacking.append("scopes")
    if alt.roles_all or alt.roles_any:
        _drop(out, idp.claims.roles_path)
        lacking.append("roles")
    if alt.claims:
        for rule in alt.claims:
            current = out
            for part in rule.path[:-1]:
                inner = current.get(part)
                current = inner if isinstance(inner, dict) else {}
            if rule.path[-1] in current:
                current[rule.path[-1]] = _other(current[rule.path[-1]])
        lacking.append("matching claims")
    if alt.acr_any:
        out.pop("acr", None)
        lacking.append("acr")
    if alt.max_auth_age_s is not None:
        out.pop("auth_time", None)
        lacking.append("recent auth_time")
    text = ", ".join(lacking[:-1]) + (" and " if len(lacking) > 1 else "") + (lacking[-1] if lacking else "")
    return out, text


def _other(value: Any) -> Any:
    """A value a claim rule does not take: `false` for `true`, 2 for 1, "not-acme" for "acme"."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    return f"not-{value}"


def _copy(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return list(v)
    return v


def _put(claims: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set a (dotted, nested) claim."""
    for part in path[:-1]:
        inner = claims.get(part)
        if not isinstance(inner, dict):
            inner = claims[part] = {}
        claims = inner
    claims[path[-1]] = value


def _drop(claims: dict[str, Any], path: tuple[str, ...]) -> None:
    """Remove a (dotted, nested) claim, and the objects it leaves empty."""
    if len(path) > 1:
        inner = claims.get(path[0])
        if isinstance(inner, dict):
            _drop(inner, path[1:])
            if not inner:
                del claims[path[0]]
    else:
        claims.pop(path[0], None)


def _fill(template: str, params: dict[str, str]) -> str:
    """A request path the template matches: each `{param}` its sample value, `**` one segment."""
    parts = []
    for s in parse_template(template):
        if s.kind == PARAM:
            parts.append(params[s.value])
        elif s.kind == GLOB:
            parts.append("example")
        else:
            parts.append(quote(s.value, safe="!$&'()+,;=:@-._~"))
    return "/" + "/".join(parts)


def _first_host(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    return str(net.network_address + 1 if net.num_addresses > 2 else net.network_address)


# --- the file ------------------------------------------------------------------------------------------------


def _flow(value: Any) -> str:
    """A value as one line of YAML flow style, quoted where YAML would read it otherwise ('yes', '1', 'a: b')."""
    text: str = yaml.safe_dump(value, default_flow_style=True, width=_WIDE, sort_keys=False, allow_unicode=True)
    return text.strip()


def _scalar(value: Any) -> str:
    return _flow([value])[1:-1]


def _comment(text: str, indent: str = "") -> str:
    """A comment of one or more lines (never a line break from a name inside it)."""
    return "\n".join(textwrap.wrap(" ".join(text.split()), 116 - len(indent), initial_indent=f"{indent}# ",
                                    subsequent_indent=f"{indent}# ", break_on_hyphens=False))  # fmt: skip


def _stamp(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _case_lines(case: Case, result: CaseResult) -> list[str]:
    request: dict[str, Any] = {"method": case.method, "path": case.path}
    if case.source != DEFAULT_SOURCE:
        request["source"] = case.source
    if case.headers:
        request["headers"] = case.headers
    lines = [f"  - name: {_scalar(case.name)}", f"    request: {_flow(request)}"]
    if case.token is not None:
        token: dict[str, Any] = {"provider": case.token.provider, "claims": case.token.claims}
        if case.token.dpop:
            token["dpop"] = True
        if case.token.mtls:
            token["mtls"] = True
        lines.append(f"    token: {_flow(token)}")
    if case.signed_by is not None:
        lines.append(f"    signed_by: {_scalar(case.signed_by)}")
    if case.at is not None:
        lines.append(f"    at: {_scalar(_stamp(case.at))}")
    expect: dict[str, Any] = {"status": result.status}
    if result.status != 200:
        expect["reason"] = result.reason
    expect["route"] = result.route
    lines.append(f"    expect: {_flow(expect)}")
    return lines


def _route_comment(route: Route) -> str:
    methods = ",".join(sorted(route.methods)) if route.methods else "any method"
    how = ["public"] if route.public else [f"authn: {', '.join(route.authn)}"]
    if route.bind:
        how.append(f"bind: {route.bind}")
    if len(route.allow) > 1:
        how.append(f"{len(route.allow)} alternatives")
    if route.mode != "enforce":
        how.append(f"mode: {route.mode}")
    return _comment(f"route {route.name} (line {route.line}): {methods} {route.path}; {'; '.join(how)}", "  ")


def _render(policy_name: str, policy: Policy, now: datetime, plans: list[_Planned]) -> str:
    stem = policy_name.removesuffix(".yaml").removesuffix(".yml")
    lines = [
        _comment(
            f"Starter tests for {policy_name}, made by `authz-agent policy test --init {policy_name}`. Keep this file "
            f"beside {policy_name} (as {stem}.test.yaml): `policy:` is read relative to it. Each expectation is what "
            "the policy decides today, so the file passes as written: read each one, change those that are not what "
            "you mean, and add the cases that matter (a run lists what no case covers)."
        ),
        f"policy: {_scalar(policy_name)}",
        f"at: {_scalar(_stamp(now))}  # the clock of every case (when this file was made); a case may set its own",
        "cases:",
    ]
    for plan in plans:
        lines.append(_route_comment(plan.route))
        lines += [_comment(n, "  ") for n in plan.notes]
        for case, result in plan.cases:
            lines += _case_lines(case, result)
    return "\n".join(lines) + "\n"
