"""Compiled conditions, judged against one request: grant window, scopes, roles, claims, network, headers, CEL
`when`, step-up. Cheap conditions first; the step-up conditions last, so a refusal by step-up means that every
other condition held and the caller can pass by authenticating again (RFC 9470)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Final
from urllib.parse import parse_qsl

from agent import reasons as R
from agent.authn.principal import Principal, claim_at
from agent.authn.strict import numeric_date
from agent.config.model import ClaimRule, Conditions, HeaderRule
from agent.decision import RequestView
from agent.policy.paths import split_request_path

# What a `when` may read (agent/policy/cel.py declares the same names to the type checker).
VARIABLES = ("claims", "client_id", "now", "params", "request", "roles", "scopes", "source", "subject")

MAX_QUERY_PARAMETERS = 64  # a query with more has no `request.query` (null): reading it is an evaluation error
# A `when` judges at most this much of the request (path, query, host and headers together): the cost bounds in
# agent/policy/cel.py assume it. Past it those fields are null, so reading one is an evaluation error (a deny
# rule holds, an alternative does not); Envoy's default header limit is 60 KiB.
MAX_WHEN_REQUEST_BYTES = 16_384


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a caller may not pass, and what the challenge tells it."""

    reason: str
    status: int = 403
    missing_scopes: tuple[str, ...] = ()
    acr_values: tuple[str, ...] = ()
    max_age: int | None = None
    detail: str = ""

    @property
    def step_up(self) -> bool:
        return self.reason == R.STEP_UP_REQUIRED


class Facts:
    """One request's facts as conditions read them; the parsed address and CEL variables are built once."""

    __slots__ = ("_address", "_headers", "_request_bounded", "_variables", "now", "params", "segments", "view", "who")

    def __init__(
        self,
        view: RequestView,
        who: Principal | None,
        params: Mapping[str, str],
        now: float,
        segments: list[str] | None = None,  # the path as the router split it, when the caller has it
    ) -> None:
        self.view = view
        self.segments = segments
        self.who = who
        self.params = params
        self.now = now
        self._address: IPv4Address | IPv6Address | bool | None = False  # False: not parsed yet
        self._variables: dict[str, Any] | None = None
        self._headers: Mapping[str, str] | None = None
        self._request_bounded: bool | None = None

    def headers(self) -> Mapping[str, str]:
        """The request's headers as an app behind a CGI/WSGI server reads them: `x_client` is `x-client` there
        (Django's and Flask's HTTP_X_CLIENT), so conditions read it so too, joined with `,` to a `x-client`
        sent beside it. Envoy's generated config refuses such names; this covers an Envoy configured without."""
        if self._headers is None:
            h = self.view.headers
            if any("_" in k for k in h):
                merged: dict[str, str] = {}
                for k, v in h.items():
                    n = k.replace("_", "-")
                    merged[n] = f"{merged[n]},{v}" if n in merged else v
                h = merged
            self._headers = h
        return self._headers

    def address(self) -> IPv4Address | IPv6Address | None:
        """The source address, IPv4-mapped IPv6 read as the IPv4 address; None when it is no address."""
        if self._address is False:
            try:
                a = ip_address(self.view.source)
            except ValueError:
                a = None
            if isinstance(a, IPv6Address) and a.ipv4_mapped is not None:
                a = a.ipv4_mapped
            self._address = a
        return self._address if not isinstance(self._address, bool) else None

    def variables(self, names: tuple[str, ...] = VARIABLES) -> dict[str, Any]:
        """The variables a `when` names (docs/policy.md lists them), each built once per request and only when
        named: parsing the source address or the query costs more than most expressions. A name such as
        `request.method` or `claims.sub` (cel.When.names) builds that record or the claims with only the
        fields and keys named: the runtime converts every entry it is handed."""
        built = self._variables
        if built is None:
            built = self._variables = {}
        out: dict[str, Any] = {}
        for root, parts in _plan(names):
            if parts is None:
                value = built.get(root, _UNSET)
                if value is _UNSET:
                    value = built[root] = _WHOLE[root](self)
            elif root == "claims":
                value = self._claims_read(parts)
            else:
                value = {}
                for key, name in parts:
                    part = built.get(name, _UNSET)
                    if part is _UNSET:
                        part = built[name] = self._field(root, key)
                    value[key] = part
            out[root] = value
        return out

    def _claims(self) -> dict[str, Any]:
        return self.who.claims if self.who is not None else {}

    def _claims_read(self, parts: tuple[tuple[str, str], ...]) -> dict[str, Any]:
        """The claims with only the keys named, when that means what the whole claims would: the runtime turns
        a map with one value it cannot convert into an error, read what may of it (cel.claims_convert)."""
        who = self.who
        if who is None:
            return {}
        claims = who.claims
        convert = who.memo.get("cel")
        if convert is None:
            # A token's first `when` hands its claims over whole: a token seen once gains nothing from the probe.
            who.memo["cel"] = _SEEN
            return claims
        if convert is _SEEN:
            from agent.policy.cel import claims_convert  # here: the runtime loads only for a policy with a `when`

            convert = who.memo["cel"] = claims_convert(claims)
        if not convert:
            return claims
        return {key: claims[key] for key, _ in parts if key in claims}

    def _subject(self) -> str:
        return self.who.subject if self.who is not None else ""

    def _client_id(self) -> str:
        return (self.who.client_id or "") if self.who is not None else ""

    def _scopes(self) -> list[str]:
        return sorted(self.who.scopes) if self.who is not None else []

    def _roles(self) -> list[str]:
        return sorted(self.who.roles) if self.who is not None else []

    def _params(self) -> dict[str, str]:
        params = self.params
        return params if type(params) is dict else dict(params)  # the runtime takes a dict (it never changes one)

    def _request(self) -> dict[str, Any]:
        return {key: self._field("request", key) for key in _REQUEST_FIELDS}

    def _source(self) -> dict[str, Any]:
        return {key: self._field("source", key) for key in _SOURCE_FIELDS}

    def _field(self, record: str, key: str) -> Any:
        """One field of `request` or `source`."""
        view = self.view
        if record == "source":
            if key == "address":
                # The address as source_cidrs reads it (an IPv4-mapped IPv6 address as IPv4), else as sent.
                a = self.address()
                return str(a) if a is not None else view.source
            return bool(view.certificate)  # certificate_present
        if key == "method":
            return view.method
        if key == "scheme":
            return view.scheme
        if not self._bounded():
            return None
        if key == "path":
            return routed_path(view.path) if self.segments is None else "/" + "/".join(self.segments)
        if key == "host":
            return normal_host(view.host)
        if key == "headers":
            return dict(self.headers())
        return first_values(view.path)  # query

    def _bounded(self) -> bool:
        """Whether path, host and headers together are within MAX_WHEN_REQUEST_BYTES (else those fields are null)."""
        bounded = self._request_bounded
        if bounded is None:
            view = self.view
            size = len(view.path) + len(view.host) + sum(len(k) + len(v) for k, v in self.headers().items())
            bounded = self._request_bounded = size <= MAX_WHEN_REQUEST_BYTES
        return bounded

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


# Each variable whole, by name (docs/policy.md lists them).
_WHOLE: dict[str, Callable[[Facts], Any]] = {name: getattr(Facts, f"_{name}") for name in VARIABLES}
_UNSET: Any = object()
_SEEN: Any = object()  # Principal.memo["cel"]: one `when` read these claims; the next probes them
_REQUEST_FIELDS = ("method", "path", "host", "scheme", "headers", "query")  # cel.REQUEST_FIELDS, in this order
_SOURCE_FIELDS = ("address", "certificate_present")
_Plan = tuple[tuple[str, tuple[tuple[str, str], ...] | None], ...]
_PLANS: dict[tuple[str, ...], _Plan] = {}
_MAX_PLANS = 4096  # one per distinct `when.names` of the policies loaded since; past it they are made again


def _plan(names: tuple[str, ...]) -> _Plan:
    """`names` as (variable, None for all of it | ((key, name), ...) for the fields or keys named)."""
    plan = _PLANS.get(names)
    if plan is None:
        grouped: dict[str, list[tuple[str, str]] | None] = {}
        for name in names:
            root, dot, key = name.partition(".")
            if not dot:
                grouped[root] = None
            elif root not in grouped:
                grouped[root] = [(key, name)]
            else:
                parts = grouped[root]
                if parts is not None:
                    parts.append((key, name))
        plan = tuple((root, None if parts is None else tuple(parts)) for root, parts in grouped.items())
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[names] = plan
    return plan


def routed_path(raw: str) -> str:
    """The path as the routes matched it: percent-decoded segments, without query or fragment.

    A `when` on the raw text would be slipped past by another spelling of the same route (`/%61dmin` is routed
    as `/admin`), so it reads what the router read."""
    segments = split_request_path(raw)
    if segments is None:  # refused by the engine before any condition is judged
        return raw.partition("#")[0].partition("?")[0]
    return "/" + "/".join(segments)


def normal_host(host: str) -> str:
    """The host in lower case, without the trailing dot of a fully qualified name: `INTERNAL.example.com.:8443`
    names the same host as `internal.example.com:8443`, and a deny rule on it must not be slipped past so."""
    host = host.lower()
    name, colon, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if colon and port.isdigit():
        return name.rstrip(".") + ":" + port
    return host.rstrip(".")


def first_values(raw: str) -> dict[str, str] | None:
    """The query as name -> first value (percent-decoded); None (CEL null) past MAX_QUERY_PARAMETERS parameters.

    Past the bound nothing is parsed (60 KiB of query cost ~70 ms to parse field by field, on every decision)
    and nothing is dropped either: a query whose later parameters were ignored would let `"debug" in
    request.query` in a deny rule be slipped past by padding. Null makes every read of it an evaluation error,
    so a deny rule holds and an alternative does not."""
    _, _, query = raw.partition("#")[0].partition("?")
    if not query:
        return {}
    if query.count("&", 0, len(query)) >= MAX_QUERY_PARAMETERS:
        return None
    first: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in first:
            # `?mode=x&mode=admin`: frameworks read the first, the last or both; a rule reading one could be
            # slipped past by the other, so a repeated name makes the whole query null (an evaluation error).
            return None
        first[name] = value
    return first


def grant_active(c: Conditions, now: float) -> bool:
    if c.not_before is None and c.not_after is None:
        return True
    t = datetime.fromtimestamp(now, UTC)
    return not ((c.not_before is not None and t < c.not_before) or (c.not_after is not None and t >= c.not_after))


# Which condition refused, as `failing` tells it: a small number, so that an alternative tried and dropped for a
# later one costs no Refusal and no detail text; `refusal` builds the answer when one is given (or traced).
HOLDS: Final = 0
GRANT_INACTIVE: Final = 1
NO_CREDENTIALS: Final = 2
SCOPES_ALL: Final = 3
SCOPES_ANY: Final = 4
ROLES_ALL: Final = 5
ROLES_ANY: Final = 6
CLAIM: Final = 7
NOT_AN_ADDRESS: Final = 8
OUTSIDE_CIDRS: Final = 9
HEADER: Final = 10
WHEN_ERROR: Final = 11
WHEN_FALSE: Final = 12
STEP_UP: Final = 13


def check(c: Conditions, f: Facts, errors_hold: bool = False) -> Refusal | None:
    """None when every condition holds; the first failing condition otherwise.

    `errors_hold`: a `when` that cannot be evaluated (a missing claim, a wrong type) and a source that is no
    address count as holding. Deny rules are judged so (fail closed); alternatives never (an error never allows).
    """
    failed = failing(c, f, errors_hold)
    return refusal(c, f, failed, errors_hold) if failed else None


def failing(c: Conditions, f: Facts, errors_hold: bool = False) -> int:
    """`check` without the Refusal: HOLDS (0) when every condition holds, else which one failed first."""
    if (c.not_before is not None or c.not_after is not None) and not grant_active(c, f.now):
        return GRANT_INACTIVE
    who = f.who
    if who is None:
        if c.credentials:
            return NO_CREDENTIALS
    elif c.credentials:
        failed = _credentials(c, who, f.params)
        if failed:
            return failed
    if c.source_cidrs:
        # Envoy sets the source, not the client: one that is no IP address (a unix socket, an internal
        # listener) is in no network, in an alternative and in a deny rule alike.
        a = f.address()
        if a is None:
            return NOT_AN_ADDRESS
        if not c.networks.contains(a):
            return OUTSIDE_CIDRS
    if c.headers and _failing_header(c, f, errors_hold) is not None:
        return HEADER
    when = c.when
    if when is not None:
        result = when.result(f.variables(when.names))
        if result is None:
            if not errors_hold:
                return WHEN_ERROR
        elif not result:
            return WHEN_FALSE
    if who is not None and (c.acr_any or c.max_auth_age_s is not None) and _needs_step_up(c, who, f.now):
        return STEP_UP
    return HOLDS


def refusal(c: Conditions, f: Facts, failed: int, errors_hold: bool = False) -> Refusal:
    """The answer for the condition `failing` named (it judged `c` on the same facts)."""
    if failed == GRANT_INACTIVE:
        return Refusal(R.GRANT_NOT_ACTIVE, detail="outside the rule's not_before/not_after window")
    if failed == NOT_AN_ADDRESS:
        return Refusal(R.CONDITION_FAILED, detail="the source is not an IP address")
    if failed == OUTSIDE_CIDRS:
        return Refusal(R.CONDITION_FAILED, detail="source address outside source_cidrs")
    if failed == HEADER:
        h = _failing_header(c, f, errors_hold)
        assert h is not None
        return Refusal(R.CONDITION_FAILED, detail=f"header {h.name} does not match")
    if failed == WHEN_ERROR:
        return Refusal(R.CONDITION_FAILED, detail="`when` could not be evaluated (counts as false)")
    if failed == WHEN_FALSE:
        return Refusal(R.CONDITION_FAILED, detail="`when` is false")
    who = f.who
    if failed == NO_CREDENTIALS or who is None:
        return Refusal(R.CONDITION_FAILED, detail="the rule reads credentials and the request has none")
    if failed == SCOPES_ALL:
        missing = tuple(sorted(c.scopes_all - who.scopes))
        return Refusal(
            R.SCOPE_MISSING, missing_scopes=tuple(sorted(c.scopes_all)), detail=f"missing scopes {' '.join(missing)}"
        )
    if failed == SCOPES_ANY:
        return Refusal(R.SCOPE_MISSING, missing_scopes=tuple(sorted(c.scopes_any)), detail="none of scopes_any")
    if failed == ROLES_ALL:
        return Refusal(R.ROLE_MISSING, detail=f"missing roles {' '.join(sorted(c.roles_all - who.roles))}")
    if failed == ROLES_ANY:
        return Refusal(R.ROLE_MISSING, detail="none of roles_any")
    if failed == CLAIM:
        rule = next(r for r in c.claims if not _claim_holds(r, who, f.params))
        return Refusal(R.CLAIM_MISMATCH, detail=f"claim {'.'.join(rule.path)} does not match")
    assert failed == STEP_UP, failed
    max_age = int(c.max_auth_age_s) if c.max_auth_age_s is not None else None
    return Refusal(R.STEP_UP_REQUIRED, status=401, acr_values=c.acr_any, max_age=max_age)


def _failing_header(c: Conditions, f: Facts, errors_hold: bool) -> HeaderRule | None:
    for h in c.headers:
        value = f.headers().get(h.name)
        if h.present is not None:
            ok = (value is not None) is h.present
        elif value is None:
            ok = False
        else:
            ok = _header_matches(h.prefix, h.equals, value)
            if not ok and errors_hold and "," in value:
                # A header sent twice reaches the agent joined by commas ("1,1"): a deny rule on its value
                # must not be slipped past so; it holds when any one of the joined values matches.
                ok = any(_header_matches(h.prefix, h.equals, v.strip()) for v in value.split(","))
        if not ok:
            return h
    return None


def _header_matches(prefix: str | None, equals: str | None, value: str) -> bool:
    return value.startswith(prefix) if prefix is not None else value == equals


def _credentials(c: Conditions, who: Principal, params: Mapping[str, str]) -> int:
    if c.scopes_all and not c.scopes_all <= who.scopes:
        return SCOPES_ALL
    if c.scopes_any and c.scopes_any.isdisjoint(who.scopes):
        return SCOPES_ANY
    if c.roles_all and not c.roles_all <= who.roles:
        return ROLES_ALL
    if c.roles_any and c.roles_any.isdisjoint(who.roles):
        return ROLES_ANY
    for rule in c.claims:
        if not _claim_holds(rule, who, params):
            return CLAIM
    return HOLDS


def _claim_holds(rule: ClaimRule, who: Principal, params: Mapping[str, str]) -> bool:
    expected: Any = params[rule.param] if rule.param is not None else rule.literal
    return _claim_matches(claim_at(who.claims, rule.path), expected)


def _needs_step_up(c: Conditions, who: Principal, now: float) -> bool:
    if c.acr_any and who.claims.get("acr") not in c.acr_any:
        return True
    if c.max_auth_age_s is not None:
        # The verifiers refused an auth_time out of range or in the future; a value that is no time (absent, or
        # from a principal that never had one checked) never counts as a recent authentication.
        auth_time = numeric_date(who.claims.get("auth_time"))
        if auth_time is None or now - auth_time > c.max_auth_age_s:
            return True
    return False


def _same(a: Any, b: Any) -> bool:
    # Type-strict: the string "1" is not the number 1, and true is not 1 (Python says True == 1).
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def _claim_matches(value: Any, expected: Any) -> bool:
    if isinstance(value, list):
        return any(_same(v, expected) for v in value)
    return value is not None and _same(value, expected)
