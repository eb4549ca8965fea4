"""Reads a policy's test file (`orders.test.yaml`) into frozen cases; every problem is an error at file:line,
as a policy's are. The format is the one docs/policy-testing.md describes; nothing here decides anything."""

from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from agent import reasons
from agent.config._read import FIELD_NAME, Ctx, get, mapping, number, timestamp
from agent.config.loader import read_bounded
from agent.config.yamlsrc import LDict, LList, line_of, load_yaml
from agent.envoyconf import REMOVED_BEFORE_AUTHZ
from agent.errors import ConfigError, ConfigErrors
from agent.policy.paths import split_request_path
from agent.policytest.credentials import REFUSED_ALGORITHMS, SIGNING_ALGORITHMS

TOP_KEYS = {"policy", "at", "cases"}
CASE_KEYS = {"name", "request", "token", "signed_by", "at", "expect", "weight", "repeat"}
REQUEST_KEYS = {"method", "path", "host", "scheme", "source", "headers", "body"}
TOKEN_KEYS = {"provider", "claims", "expires_in", "alg", "dpop", "mtls", "scheme"}
EXPECT_KEYS = {"status", "reason", "route", "upstream_headers", "headers"}
DEFAULT_SOURCE = "192.0.2.10"  # TEST-NET-1 (RFC 5737): an address no real network uses
MAX_CASES = 10_000  # per file: a control plane runs these before it publishes
MAX_REPEAT = 1_000  # requests one case may send (to exhaust a rate limit)
MAX_REQUESTS = 100_000  # requests one file may send in all (its cases' repeats)
MAX_BODY_BYTES = 1 << 20  # what Envoy buffers for the agent (agent.envoyconf.MAX_BODY_BYTES)
MAX_BODIES_BYTES = 16 << 20  # every case's body in all (YAML aliases could repeat one many times)
MAX_FILE_BYTES = 8 << 20
EARLIEST = datetime(1970, 1, 2, tzinfo=UTC)
LATEST = datetime(9999, 11, 30, tzinfo=UTC)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
REASONS = frozenset(v for k, v in vars(reasons).items() if k.isupper() and isinstance(v, str))
_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """A token the runner mints: claims as written (None: leave the claim out), and how it is bound and sent."""

    provider: str | None = None
    claims: dict[str, Any] = field(default_factory=dict)
    expires_in: float | None = None
    alg: str | None = None
    dpop: bool = False
    mtls: bool = False
    scheme: str | None = None
    line: int = 0


@dataclass(frozen=True, slots=True)
class Expect:
    status: int | None = None
    reason: str | None = None
    route: Any = _UNSET  # a route name, None for "no route matched", _UNSET when not checked
    upstream_headers: dict[str, str | None] | None = None
    headers: dict[str, str | None] | None = None

    @property
    def checks_route(self) -> bool:
        return self.route is not _UNSET


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    line: int
    method: str
    path: str
    host: str | None
    scheme: str
    source: str
    headers: dict[str, str]
    body: bytes
    expect: Expect
    token: TokenSpec | None = None
    signed_by: str | None = None
    at: datetime | None = None
    weight: float = 1.0
    repeat: int = 1  # the request is sent this many times (same caller, fresh proofs); `expect` judges the last
    # Where the names the policy must know are written (signed_by, token.provider, expect.route), for errors
    lines: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TestFile:
    path: Path
    policy_path: Path
    at: datetime | None
    cases: tuple[Case, ...]


def read_test_file(path: Path) -> TestFile:
    """Read and check a test file; raises ConfigErrors listing every problem with its line."""
    file = str(path)
    try:
        text = read_bounded(path, MAX_FILE_BYTES)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigErrors([ConfigError(f"cannot read the test file: {e}", file, 0)]) from None
    try:
        doc = load_yaml(text, file)
    except ConfigError as e:
        raise ConfigErrors([e]) from None
    if not isinstance(doc, LDict):
        raise ConfigErrors([ConfigError("a test file is a mapping: policy:, cases: (and at:)", file, 1)])
    ctx = Ctx(file, path.parent)
    ctx.keys(doc, TOP_KEYS, "tests")
    policy = get(ctx, doc, "policy", str, "tests")
    if not policy:
        ctx.err(
            line_of(doc, "policy", 1), "'policy' is required: the policy file these cases test, relative to this file"
        )
    at = _at(ctx, doc, "tests")
    cases: list[Case] = []
    cl = doc.get("cases")
    if not isinstance(cl, LList) or not cl:
        ctx.err(line_of(doc, "cases", 1), "'cases' must be a non-empty list of {name, request, expect, ...}")
    elif len(cl) > MAX_CASES:
        ctx.err(cl.line, f"{len(cl)} cases; at most {MAX_CASES} in one file")
    else:
        names: dict[str, int] = {}
        bodies = 0
        for i, item in enumerate(cl):
            if bodies > MAX_BODIES_BYTES:  # said before more bodies are made (one YAML alias can fill many cases)
                break
            if not isinstance(item, LDict):
                ctx.err(cl.lines[i], f"cases[{i}] must be a mapping with name, request and expect")
                continue
            case = _case(ctx, item, i)
            if case is None:
                continue
            if case.name in names:
                ctx.err(
                    item.lines.get("name", item.line),
                    f"case name {case.name!r} is already used at line {names[case.name]}",
                )
            names[case.name] = case.line
            cases.append(case)
            bodies += len(case.body)
        if bodies > MAX_BODIES_BYTES:
            ctx.err(cl.line, f"the cases' bodies are over {MAX_BODIES_BYTES} bytes in all; cases after that unread")
    total = sum(c.repeat for c in cases)
    if total > MAX_REQUESTS:
        ctx.err(line_of(doc, "cases", 1), f"the cases send {total} requests in all (repeat); at most {MAX_REQUESTS}")
    if ctx.errors:
        raise ConfigErrors(sorted(ctx.errors, key=lambda e: e.line))
    return TestFile(path, ctx.path(str(policy)), at, tuple(cases))


def _case(ctx: Ctx, d: LDict, i: int) -> Case | None:
    n_errors = len(ctx.errors)
    name = d.get("name")
    where = f"cases[{i}]" + (f" ({name})" if isinstance(name, str) and name else "")
    ctx.keys(d, CASE_KEYS, where)
    for key in ("request", "token", "expect", "signed_by", "at"):
        if key in d and d[key] is None:  # `token:` left empty would run the case without one, and pass for it
            ctx.err(d.lines[key], f"{where}.{key} is empty; give it a value or remove the key")
    if not isinstance(name, str) or not name.strip():
        ctx.err(d.lines.get("name", d.line), f"{where}: every case needs a non-empty 'name'")
    rq = mapping(ctx, d, "request", where)
    if rq is None:
        ctx.err(d.line, f"{where}: 'request' is required, e.g. {{method: GET, path: /v1/orders}}")
        rq = LDict()
        rq.line, rq.lines, rq.texts = d.line, {}, {}
    else:
        ctx.keys(rq, REQUEST_KEYS, f"{where}.request")
    rw = f"{where}.request"
    method = get(ctx, rq, "method", str, rw, "GET")
    path = get(ctx, rq, "path", str, rw)
    if "request" in d and not path:
        ctx.err(line_of(rq, "path", rq.line), f"{rw}: 'path' is required (it may carry a query: /v1/orders?page=2)")
    elif path and not path.startswith("/"):
        ctx.err(rq.lines["path"], f"{rw}.path must start with '/', got {path!r}")
    elif path and split_request_path(path) is None:
        why = "Envoy (as envoy-config sets it up) resolves dot segments, merges slashes and refuses escaped slashes"
        ctx.err(rq.lines["path"], f"{rw}.path {path!r} never reaches the agent as written: {why}; write what it passes")
    scheme = get(ctx, rq, "scheme", str, rw, "https")
    if scheme not in ("http", "https"):
        ctx.err(rq.lines["scheme"], f"{rw}.scheme must be http or https, got {scheme!r}")
    source = get(ctx, rq, "source", str, rw, DEFAULT_SOURCE)
    try:
        ipaddress.ip_address(source)
    except ValueError:
        ctx.err(rq.lines["source"], f"{rw}.source must be an IP address, got {source!r}")
    headers = _headers(ctx, rq, "headers", rw, allow_null=False)
    text = get(ctx, rq, "body", str, rw, "")
    body = b""
    if len(text) > MAX_BODY_BYTES or len(body := text.encode("utf-8")) > MAX_BODY_BYTES:  # chars <= bytes
        ctx.err(rq.lines["body"], f"{rw}.body is larger than {MAX_BODY_BYTES} bytes")
    token = _token(ctx, d, where)
    if token is not None and "authorization" in headers:
        ctx.err(d.lines["token"], f"{where}: give 'token' or an authorization header, not both")
    signed_by = get(ctx, d, "signed_by", str, where)
    weight = number(ctx, d, "weight", where, 1.0)
    if "weight" in d and weight <= 0:
        ctx.err(d.lines["weight"], f"{where}.weight must be above 0")
    repeat = get(ctx, d, "repeat", int, where, 1)
    if not 1 <= repeat <= MAX_REPEAT:
        ctx.err(d.lines["repeat"], f"{where}.repeat must be from 1 to {MAX_REPEAT}, got {repeat}")
    expect = _expect(ctx, d, where)
    if len(ctx.errors) != n_errors or expect is None:
        return None
    lines = {"signed_by": line_of(d, "signed_by", d.line), "route": line_of(d.get("expect"), "route", d.line)}
    lines["provider"] = line_of(d.get("token"), "provider", d.line)
    return Case(
        name=str(name).strip(),
        line=d.line,
        method=str(method),
        path=str(path),
        host=get(ctx, rq, "host", str, rw),
        scheme=str(scheme),
        source=str(source),
        headers={k: v for k, v in headers.items() if v is not None},
        body=body,
        expect=expect,
        token=token,
        signed_by=signed_by,
        at=_at(ctx, d, where),
        weight=weight,
        repeat=repeat,
        lines=lines,
    )


def _headers(ctx: Ctx, d: LDict, key: str, where: str, allow_null: bool) -> dict[str, str | None]:
    """Header names (matched without regard to case, as HTTP does) to values; null only where it means absent."""
    m = mapping(ctx, d, key, where)
    out: dict[str, str | None] = {}
    for name, value in (m or {}).items():
        assert m is not None
        line = m.lines[name]
        lower = str(name).lower()
        if FIELD_NAME.fullmatch(lower) is None:
            ctx.err(line, f"{where}.{key}: {name!r} is not a header field name")
        elif lower in out:
            ctx.err(line, f"{where}.{key}: {name!r} is given twice (names are not case-sensitive)")
        elif not allow_null and (problem := not_delivered(lower, value)) is not None:
            ctx.err(line, f"{where}.{key}: {name!r}: {problem}")
        if value is None and allow_null:
            out[lower] = None
        elif isinstance(value, str | int | float) and not isinstance(value, bool):
            # A number as written: `x-api-version: 010` sends "010", not YAML's reading of it (8)
            span = m.texts.get(name)
            out[lower] = value if isinstance(value, str) else span.value if span is not None else str(value)
            if _CONTROL.search(out[lower] or "") is not None:
                ctx.err(line, f"{where}.{key}.{name}: a header value cannot hold a control character (CR, LF, NUL)")
        else:
            absent = " (or null: must be absent)" if allow_null else ""
            ctx.err(line, f"{where}.{key}.{name} must be a string{absent}, got {value!r}")
    return out


def _at(ctx: Ctx, d: LDict, where: str) -> datetime | None:
    """A frozen clock, within what a token's times, a certificate's validity and a DPoP nonce can carry."""
    at = timestamp(ctx, d, "at", where)
    if at is not None and not EARLIEST <= at <= LATEST:
        ctx.err(d.lines["at"], f"{where}.at must be between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d}, got {at}")
        return None
    return at


def not_delivered(name: str, value: object) -> str | None:
    """Why a request header of this name never reaches the agent as written behind the recommended Envoy config,
    or None: a case must describe a request the agent can receive."""
    if "_" in name:
        return "Envoy (as envoy-config sets it up) refuses header names with underscores with a 400"
    if name == "host":
        return "the host is request.host"
    if name in REMOVED_BEFORE_AUTHZ:
        return "Envoy (as envoy-config sets it up) removes it from a client's request before the agent sees it"
    if name == "te" and value != "trailers":
        return "Envoy passes te on only as 'trailers'"
    return None


def _token(ctx: Ctx, d: LDict, where: str) -> TokenSpec | None:
    if "token" not in d:
        return None
    t = mapping(ctx, d, "token", where)
    if t is None:
        return None
    tw = f"{where}.token"
    ctx.keys(t, TOKEN_KEYS, tw)
    claims = mapping(ctx, t, "claims", tw)
    alg = get(ctx, t, "alg", str, tw)
    if alg is not None and alg not in SIGNING_ALGORITHMS | REFUSED_ALGORITHMS:
        known = ", ".join(sorted(SIGNING_ALGORITHMS | REFUSED_ALGORITHMS))
        ctx.err(t.lines["alg"], f"{tw}.alg {alg!r} is not a JWS algorithm the runner can sign with ({known})")
    expires_in = get(ctx, t, "expires_in", (int, float), tw)
    if expires_in is not None and claims is not None and "exp" in claims:
        ctx.err(t.lines["expires_in"], f"{tw}: give expires_in or claims.exp, not both")
    dpop = bool(get(ctx, t, "dpop", bool, tw, False))
    mtls = bool(get(ctx, t, "mtls", bool, tw, False))
    if (dpop or mtls) and claims is not None and "cnf" in claims:
        ctx.err(claims.lines["cnf"], f"{tw}: dpop/mtls bind the token themselves (cnf); leave claims.cnf out")
    for name, value in (claims or {}).items():
        assert claims is not None
        odd = _not_json(value)
        if odd is not None:
            fix = "quote it, or write a time with its zone (2026-12-01T00:00:00Z) for seconds since 1970"
            ctx.err(claims.lines[name], f"{tw}.claims.{name}: {odd} is not a JSON value; {fix}")
    scheme = get(ctx, t, "scheme", str, tw)
    if scheme is not None and (not scheme or not scheme.isascii() or not scheme.isalnum()):
        ctx.err(t.lines["scheme"], f"{tw}.scheme must be an authorization scheme such as Bearer or DPoP")
    return TokenSpec(
        provider=get(ctx, t, "provider", str, tw),
        claims=_plain(claims) if claims is not None else {},
        expires_in=float(expires_in) if expires_in is not None else None,
        alg=alg,
        dpop=dpop,
        mtls=mtls,
        scheme=scheme,
        line=t.line,
    )


def _not_json(v: Any) -> str | None:
    """What in a claim's value a token cannot carry (YAML's dates, !!binary...), or None when it is all JSON."""
    if isinstance(v, dict):
        return next((p for p in map(_not_json, v.values()) if p is not None), None)
    if isinstance(v, list):
        return next((p for p in map(_not_json, v) if p is not None), None)
    if v is None or isinstance(v, str | int | float | datetime):
        return None
    return f"the date {v.isoformat()}" if isinstance(v, date) else f"a YAML {type(v).__name__} value"


def _plain(v: Any) -> Any:
    """Claims as JSON values: the file's mappings and lists as plain ones; a time as NumericDate seconds."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, datetime):
        return int(v.timestamp())
    return v


def _expect(ctx: Ctx, d: LDict, where: str) -> Expect | None:
    e = mapping(ctx, d, "expect", where)
    if e is None:
        if "expect" not in d:
            ctx.err(d.line, f"{where}: 'expect' is required, e.g. {{status: 200, route: list-orders}}")
        return None
    ew = f"{where}.expect"
    ctx.keys(e, EXPECT_KEYS, ew)
    if not any(e.get(k) for k in ("status", "reason", "upstream_headers", "headers")) and "route" not in e:
        # `expect: {headers: {}}` would pass whatever the decision: a case that checks nothing is an error
        ctx.err(e.line, f"{ew} checks nothing; expect at least a status, a reason, a route or a header")
    status = get(ctx, e, "status", int, ew)
    if status is not None and not 100 <= status <= 599:
        ctx.err(e.lines["status"], f"{ew}.status must be an HTTP status (100-599), got {status}")
    reason = get(ctx, e, "reason", str, ew)
    if reason is not None and reason not in REASONS:
        hint = difflib.get_close_matches(reason, sorted(REASONS), n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else "see docs/policy.md for the reason codes"
        ctx.err(e.lines["reason"], f"{ew}.reason {reason!r} is not a reason code; {fix}")
    route: Any = _UNSET
    if "route" in e:
        route = e["route"]
        if route is not None and (not isinstance(route, str) or not route):
            ctx.err(e.lines["route"], f"{ew}.route must be a route name (or null: no route matched), got {route!r}")
    upstream = _headers(ctx, e, "upstream_headers", ew, allow_null=True) if "upstream_headers" in e else None
    headers = _headers(ctx, e, "headers", ew, allow_null=True) if "headers" in e else None
    return Expect(status, reason, route, upstream, headers)
