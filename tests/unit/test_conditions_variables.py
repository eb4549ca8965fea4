"""A `when` is handed only what it reads (the fields of `request` / `source` and the claims it names): it must
decide exactly as when handed every variable whole, on a token's first request and on every later one."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.authn.principal import Principal
from agent.decision import RequestView
from agent.policy.cel import When, compile_when
from agent.policy.conditions import MAX_WHEN_REQUEST_BYTES, Facts

# Reads by name (select, literal index, has(), `in`), whole reads (size, iteration, a computed key), nested claims,
# and expressions that error (a missing key, a wrong type).
EXPRESSIONS = [
    'claims.sub == "alice"',
    'claims["sub"] == params.user',
    "has(claims.level) && claims.level >= 2",
    '"level" in claims || "org" in claims',
    "claims.level >= 2",
    'claims.org.name == "acme" || claims.sub == "bob"',
    "claims.sub == params.user || claims.level == 1",
    "size(claims) > 3",
    'claims.exists(k, k == "level")',
    "claims[params.user] == 1",
    'claims.level >= 2 && request.method == "GET"',
    'request.method == "GET" && request.path.startsWith("/v1")',
    'request.headers["x-env"] == "prod"',
    '"debug" in request.query',
    'request.host == "api.example" || request.scheme == "https"',
    "size(request) == 6 && size(source) == 2",
    'source.address.startsWith("10.")',
    "source.certificate_present || subject == params.user",
    '"support" in roles && scopes.exists(s, s == "orders:read")',
    'client_id == "web" && now.getHours("Europe/Berlin") >= 0',
]
WHENS = [compile_when(text) for text in EXPRESSIONS]

TOO_BIG = [2**64, -(2**63) - 1, 2**70]  # integers the runtime cannot convert
values = st.one_of(
    st.integers(-3, 3),
    st.sampled_from(TOO_BIG),
    st.text(max_size=4),
    st.none(),
    st.booleans(),
    st.lists(st.integers(0, 3) | st.sampled_from(TOO_BIG), max_size=2),
)
claim_sets = st.fixed_dictionaries(
    {"sub": st.sampled_from(["alice", "bob", 7])},
    optional={
        "level": values,
        "org": st.fixed_dictionaries({}, optional={"name": st.sampled_from(["acme", "other"]), "n": values}),
        "alice": values,
        "extra": values,
    },
)


@st.composite
def requests(draw: st.DrawFn) -> RequestView:
    headers: dict[str, str] = draw(
        st.dictionaries(st.sampled_from(["x-env", "x-other", "x_env"]), st.sampled_from(["prod", "dev", ""]))
    )
    if draw(st.booleans()):
        headers["x-pad"] = "p" * MAX_WHEN_REQUEST_BYTES  # past the bound: path, host, headers, query are null
    path = draw(st.sampled_from(["/v1/a", "/v2/b", "/v1/%61?debug=1", "/v1/a?x=1&x=2"]))
    return RequestView(
        draw(st.sampled_from(["GET", "POST"])),
        path,
        host=draw(st.sampled_from(["API.example.", "api.example", "other:8443"])),
        headers=headers,
        source=draw(st.sampled_from(["10.1.2.3", "::ffff:10.0.0.1", "192.0.2.1", "unix:/run/x"])),
        scheme=draw(st.sampled_from(["https", "http"])),
        certificate=draw(st.sampled_from(["", "pem"])),
    )


def principal(claims: dict[str, Any]) -> Principal:
    return Principal(
        subject=str(claims["sub"]),
        issuer="https://idp.example",
        method="jwt",
        client_id="web",
        scopes=frozenset({"orders:read"}),
        roles=frozenset({"support"}),
        claims=claims,
    )


def whole(when: When, view: RequestView, who: Principal | None, params: dict[str, str]) -> bool | None:
    return when.result(Facts(view, who, params, 1_720_000_000.0).variables())


@settings(max_examples=300, deadline=None)
@given(claim_sets, requests(), st.sampled_from([{"user": "alice"}, {"user": "bob"}]), st.booleans())
def test_a_when_handed_what_it_reads_decides_as_with_every_variable_whole(
    claims: dict[str, Any], view: RequestView, params: dict[str, str], anonymous: bool
) -> None:
    who = None if anonymous else principal(claims)
    expected = [whole(w, view, principal(claims) if who else None, params) for w in WHENS]
    for use in range(3):  # a token's first request hands its claims whole, the second probes, then by key
        facts = Facts(view, who, params, 1_720_000_000.0)
        got = [w.result(facts.variables(w.names)) for w in WHENS]
        assert got == expected, (use, [e for e, g, x in zip(EXPRESSIONS, got, expected, strict=True) if g != x])


def test_names_list_only_the_fields_and_claims_read_by_name() -> None:
    def names(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        when = compile_when(text)
        return when.names, when.roots

    assert names('claims.sub == params.user && request.method == "GET"') == (
        ("claims.sub", "params", "request.method"),
        ("claims", "params", "request"),
    )
    assert names('has(claims.a) && "b" in claims && claims["c"].d == 1') == (
        ("claims.a", "claims.b", "claims.c"),
        ("claims",),
    )
    assert names("size(claims) > 1 && claims.a == 1") == (("claims",), ("claims",))
    assert names("claims[subject] == 1") == (("claims", "subject"), ("claims", "subject"))
    assert names('request.exists(k, k == "x") && source.address == "a"') == (
        ("request", "source.address"),
        ("request", "source"),
    )
    assert names("now.getHours() < 12") == (("now",), ("now",))


def test_a_record_is_built_with_only_the_fields_named() -> None:
    view = RequestView("GET", "/v1/a?q=1", "API.example.", {"x-a": "1"}, source="::ffff:10.0.0.1")
    facts = Facts(view, None, {}, 0.0)
    assert facts.variables(("request.host", "request.method", "source.address")) == {
        "request": {"host": "api.example", "method": "GET"},
        "source": {"address": "10.0.0.1"},
    }
    assert facts.variables(("request",))["request"] == {
        "method": "GET",
        "path": "/v1/a",
        "host": "api.example",
        "scheme": "",
        "headers": {"x-a": "1"},
        "query": {"q": "1"},
    }


def test_claims_the_runtime_cannot_convert_keep_every_read_of_them_an_error() -> None:
    # One value past 64 bits makes the runtime's `claims` an error, whatever key is read: handed only `sub`, the
    # expression would hold. It must not, on the token's first request or any later one.
    who = principal({"sub": "alice", "big": 2**70})
    when = compile_when('claims.sub == "alice"')
    view = RequestView("GET", "/")
    for _ in range(3):
        assert when.result(Facts(view, who, {}, 0.0).variables(when.names)) is None
    fine = principal({"sub": "alice", "big": 2**63})  # an unsigned integer: converts
    for _ in range(3):
        facts = Facts(view, fine, {}, 0.0)
        assert when.result(facts.variables(when.names)) is True
    assert facts.variables(when.names) == {"claims": {"sub": "alice"}}  # by key, once probed
