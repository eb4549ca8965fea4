"""Loading policy language v2: alternatives, deny rules, providers, networks, headers, `when` and claim limit keys.
Every mistake is refused at its line (and column, inside a CEL expression); what the clock or a missing provider
list makes doubtful is a warning, never a refusal."""

from __future__ import annotations

import base64
import itertools
import os
from ipaddress import IPv4Network, IPv6Network

import pytest

from agent.config import Policy, load_policy_text
from agent.decision import RequestView
from agent.engine import Engine
from agent.errors import ConfigError, ConfigErrors
from tests.unit.test_config import IDP

PARTNER = """\
  partner:
    issuer: https://partner.example.com
    jwks_uri: https://partner.example.com/jwks.json
    audiences: [orders-api]
    algorithms: [RS256]
"""
JWT_ROUTE = """\
routes:
  - name: r
    match: {path: "/v1/tenants/{tenant}/orders"}
    authn: [jwt]
"""
PUBLIC_ROUTE = """\
routes:
  - name: health
    match: {path: /healthz}
    public: true
"""


def load(text: str) -> Policy:
    return load_policy_text(text, "p.yaml")


def refused(text: str) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as caught:
        load(text)
    return caught.value.errors


def only(text: str) -> ConfigError:
    errors = refused(text)
    assert len(errors) == 1, [str(e) for e in errors]
    return errors[0]


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


# ---------------------------------------------------------------------------------------------------------------
# Alternatives.


def test_allow_as_a_mapping_or_a_list_of_alternatives() -> None:
    one = load(IDP + JWT_ROUTE + "    allow: {scopes_any: [a]}\n")
    assert len(one.routes[0].allow) == 1
    text = IDP + JWT_ROUTE + "    allow:\n      - {scopes_any: [a]}\n      - {}\n      - roles_any: [b]\n"
    (route,) = load(text).routes
    assert [alt.line for alt in route.allow] == [line_of(text, "[a]"), line_of(text, "- {}"), line_of(text, "[b]")]
    assert route.allow[1].scopes_any == frozenset() and route.allow[2].roles_any == {"b"}


def test_allow_as_an_empty_list_is_refused() -> None:
    text = IDP + JWT_ROUTE + "    allow: []\n"
    error = only(text)
    assert error.line == line_of(text, "allow: []")
    assert "empty list, so nothing could ever pass" in error.message


def test_an_alternative_that_is_not_a_mapping_is_refused() -> None:
    text = IDP + JWT_ROUTE + "    allow:\n      - {}\n      - scopes_any\n"
    error = only(text)
    assert (error.line, error.message) == (
        line_of(text, "- scopes_any"),
        "routes[0] (r).allow[1] must be a mapping of conditions ({} admits any caller)",
    )


def test_more_alternatives_than_the_bound_are_refused() -> None:
    many = "".join(f"      - {{scopes_any: [s{i}]}}\n" for i in range(65))
    assert "at most 64" in only(IDP + JWT_ROUTE + "    allow:\n" + many).message
    assert len(load(IDP + JWT_ROUTE + "    allow:\n" + many[: -len(many) // 65]).routes[0].allow) == 64


def test_unknown_key_in_an_alternative_names_its_line() -> None:
    text = IDP + JWT_ROUTE + "    allow:\n      - {}\n      - {source_cidr: [10.0.0.0/8]}\n"
    error = only(text)
    assert error.line == line_of(text, "source_cidr:") and "did you mean 'source_cidrs'" in error.message


def test_acr_any_keeps_the_written_order_of_preference() -> None:
    for order in itertools.permutations(["mfa", "hwk", "pwd", "otp"]):
        text = IDP + JWT_ROUTE + f"    allow: {{acr_any: [{', '.join(order)}]}}\n"
        assert load(text).routes[0].allow[0].acr_any == order


# ---------------------------------------------------------------------------------------------------------------
# Deny rules.


def test_a_deny_rule_without_a_name_is_refused() -> None:
    text = IDP + JWT_ROUTE + "    allow: {}\n    deny:\n      - source_cidrs: [10.0.0.0/8]\n"
    error = only(text)
    assert error.line == line_of(text, "- source_cidrs")
    assert "every deny rule needs a non-empty 'name'" in error.message


def test_a_deny_rule_without_conditions_is_refused() -> None:
    text = IDP + JWT_ROUTE + "    allow: {}\n    deny:\n      - name: everything\n"
    error = only(text)
    assert error.line == line_of(text, "- name: everything")
    assert "(everything): no conditions, so it would refuse every request" in error.message


@pytest.mark.parametrize("key", ["acr_any: [mfa]", "max_auth_age_s: 300"])
def test_a_deny_rule_with_step_up_conditions_is_refused(key: str) -> None:
    text = IDP + JWT_ROUTE + f"    allow: {{}}\n    deny:\n      - name: weak\n        {key}\n"
    error = only(text)
    assert error.line == line_of(text, key)
    assert "step-up conditions belong in allow; a deny rule cannot ask for one" in error.message


def test_deny_rule_names_are_unique_in_a_list() -> None:
    text = (
        IDP
        + JWT_ROUTE
        + ("    allow: {}\n    deny:\n      - {name: a, headers: {x-a: '1'}}\n      - {name: a, headers: {x-b: '1'}}\n")
    )
    error = only(text)
    assert error.line == line_of(text, "x-b") and "already used at line" in error.message


def test_deny_must_be_a_non_empty_list() -> None:
    for value in ("[]", "{name: a, headers: {x-a: '1'}}"):
        error = only(IDP + JWT_ROUTE + f"    allow: {{}}\n    deny: {value}\n")
        assert "must be a non-empty list of rules" in error.message


@pytest.mark.parametrize(
    ("condition", "reads"),
    [
        ("claims: {client_id: bad}", "reads claims"),
        ("scopes_any: [admin]", "reads scopes_any"),
        ("when: 'subject == \"mallory\"'", "reads `subject`"),
        ('when: \'claims.tenant == "x" && request.method == "POST"\'', "reads `claims`"),
    ],
)
def test_a_public_routes_deny_rule_reading_credentials_is_refused(condition: str, reads: str) -> None:
    text = IDP + PUBLIC_ROUTE + f"    deny:\n      - name: blk\n        {condition}\n"
    error = only(text)
    assert error.line == line_of(text, "- name: blk")
    assert reads in error.message and "which a public route never has" in error.message


def test_a_public_routes_deny_rule_on_request_and_source_loads() -> None:
    text = (
        IDP
        + PUBLIC_ROUTE
        + (
            "    deny:\n      - name: scanners\n"
            '        when: \'request.headers["user-agent"].startsWith("sqlmap") || source.address == "192.0.2.1"\'\n'
        )
    )
    policy = load(text)
    (rule,) = policy.routes[0].deny
    assert (rule.name, rule.line, policy.warnings) == ("scanners", line_of(text, "- name: scanners"), ())


def test_a_top_level_deny_rule_reading_credentials_loads_with_a_warning() -> None:
    text = IDP + "deny:\n  - {name: blk, claims: {client_id: bad}}\n  - {name: net, source_cidrs: [192.0.2.0/24]}\n"
    policy = load(text + JWT_ROUTE + "    allow: {}\n")
    assert [r.name for r in policy.deny] == ["blk", "net"]
    ((line, message),) = policy.warnings
    assert line == line_of(text, "name: blk")
    assert "judged only on routes that authenticate; public routes are not covered" in message


def test_a_header_envoy_removes_before_the_agent_sees_it_is_warned_of() -> None:
    """A condition on x-envoy-internal (or a signature covering it) passes `policy test` only if the case sends it,
    which `policy test` refuses: behind envoy-config's Envoy the agent never sees it."""
    text = (
        IDP
        + "hmac_clients:\n  batch:\n    key_env: BATCH_KEY\n"
        + "    components: ['@method', x-envoy-original-path, x-request-id]\n"
        + "deny:\n  - {name: outside, headers: {x-envoy-internal: {present: false}}}\n"
        + JWT_ROUTE
        + "    allow: {headers: {x-forwarded-client-cert: {present: true}, x-tenant: acme}}\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATCH_KEY", base64.b64encode(os.urandom(32)).decode())
        policy = load(text)
    assert [(line, message.split(":")[0]) for line, message in policy.warnings] == [
        (line_of(text, "components:"), "hmac_clients.batch.components"),
        (line_of(text, "components:"), "hmac_clients.batch.components"),
        (line_of(text, "x-envoy-internal"), "deny[0] (outside).headers.x-envoy-internal"),
        (line_of(text, "x-forwarded-client-cert"), "routes[0] (r).allow.headers.x-forwarded-client-cert"),
    ]
    messages = [message for _, message in policy.warnings]
    assert "removes x-envoy-original-path before the agent sees it, so a signature covering it never" in messages[0]
    assert "replaces x-request-id before the agent sees it" in messages[1]
    assert messages[2].endswith("removes x-envoy-internal from a client's request before the agent sees it, so this "
                                "condition judges a header that is never there")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Providers.


def test_an_unknown_provider_name_is_refused_with_a_suggestion() -> None:
    text = IDP + JWT_ROUTE + "    providers: [crop]\n    allow: {}\n"
    error = only(text)
    assert error.line == line_of(text, "providers: [crop]")
    assert error.message == "routes[0] (r).providers: 'crop' is not an identity provider; did you mean 'corp'?"
    top = IDP + "providers: [cop]\n" + JWT_ROUTE + "    allow: {}\n"
    error = only(top)
    assert error.line == line_of(top, "providers: [cop]") and "did you mean 'corp'?" in error.message
    far = only(IDP + JWT_ROUTE + "    providers: [zzz]\n    allow: {}\n")
    assert far.message.endswith("'zzz' is not an identity provider; configured: corp")


def test_providers_on_a_route_without_jwt_or_empty_are_refused() -> None:
    public = only(IDP + PUBLIC_ROUTE + "    providers: [corp]\n")
    assert "a public route takes no 'providers'" in public.message
    empty = only(IDP + JWT_ROUTE + "    providers: []\n    allow: {}\n")
    assert "providers is empty, so no token could pass" in empty.message


def test_several_providers_and_a_jwt_route_naming_none_is_a_warning() -> None:
    text = IDP + PARTNER + JWT_ROUTE + "    allow: {}\n"
    policy = load(text)
    ((line, message),) = policy.warnings
    assert line == line_of(text, "authn: [jwt]")
    assert "takes tokens from every identity provider (corp, partner)" in message
    assert policy.routes[0].providers is None
    named = load(IDP + PARTNER + JWT_ROUTE + "    providers: [partner]\n    allow: {}\n")
    assert (named.warnings, named.routes[0].providers) == ((), frozenset({"partner"}))
    default = load(IDP + PARTNER + "providers: [corp]\n" + JWT_ROUTE + "    allow: {}\n")
    assert (default.warnings, default.routes[0].providers) == ((), frozenset({"corp"}))
    single = load(IDP + JWT_ROUTE + "    allow: {}\n")  # one provider: nothing to choose between
    assert single.warnings == ()


# ---------------------------------------------------------------------------------------------------------------
# claim: rate-limit keys.


def test_claim_limit_keys_load_with_dotted_paths() -> None:
    text = IDP + JWT_ROUTE + "    allow: {}\n    rate_limit: {key: [claim:org.id, route], per_second: 5}\n"
    limit = load(text).routes[0].rate_limit
    assert limit is not None and limit.key == ("claim:org.id", "route")


@pytest.mark.parametrize("key", ["claim:", "claim:org..id", "claim:.id"])
def test_a_claim_limit_key_without_a_claim_path_is_refused(key: str) -> None:
    error = only(IDP + JWT_ROUTE + f'    allow: {{}}\n    rate_limit: {{key: "{key}", per_second: 5}}\n')
    assert "needs a claim name or dotted path, e.g. claim:tenant_id" in error.message


def test_a_claim_limit_key_on_a_public_route_is_refused() -> None:
    text = IDP + PUBLIC_ROUTE + "    rate_limit: {key: claim:tenant_id, per_second: 5}\n"
    error = only(text)
    assert error.line == line_of(text, "rate_limit:")
    assert "a public route has no claims; key it by source_ip or a header" in error.message


# ---------------------------------------------------------------------------------------------------------------
# Networks and headers.


def test_source_cidrs_load_v4_v6_and_ipv4_mapped_networks_as_ipv4() -> None:
    text = IDP + JWT_ROUTE + '    allow:\n      source_cidrs: [10.0.0.0/8, "2001:db8::/32", "::ffff:10.0.0.0/104"]\n'
    nets = load(text).routes[0].allow[0].source_cidrs
    assert nets == (IPv4Network("10.0.0.0/8"), IPv6Network("2001:db8::/32"), IPv4Network("10.0.0.0/8"))


@pytest.mark.parametrize(
    ("cidr", "why"),
    [
        ("10.0.0.1/8", "host bits are set; write the network address"),
        ("10.0.0.0/33", "not a network"),
        ("office", "not a network"),
        ("2001:db8::1/32", "host bits are set"),
    ],
)
def test_a_bad_network_is_refused(cidr: str, why: str) -> None:
    text = IDP + JWT_ROUTE + f'    allow:\n      source_cidrs: ["{cidr}"]\n'
    error = only(text)
    assert error.line == line_of(text, "source_cidrs") and f"{cidr!r} is {why}" in error.message


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ("{X-Env: prod}", "'X-Env' is not a lower-case header name (Envoy passes names lower-case)"),
        ("{authorization: x}", "a condition on a credential header is never written in a policy"),
        ("{cookie: {present: true}}", "a condition on a credential header"),
        ("{x-env: {equals: prod}}", "must be a value (a string), {present: true|false} or {prefix: P}"),
        ("{x-env: {present: yes-please}}", "present must be true or false"),
        ("{x-env: {prefix: ''}}", "prefix must be a non-empty string"),
        ("{x-env: 7}", "must be a value (a string)"),
        ("{}", "headers is empty"),
        ("{x_env: a, x-env: b}", "x-env is named twice (a name's '_' is read as '-')"),
        ("{proxy_authorization: x}", "a condition on a credential header"),
    ],
)
def test_header_condition_mistakes_are_refused(headers: str, message: str) -> None:
    text = IDP + JWT_ROUTE + f"    allow:\n      headers: {headers}\n"
    error = only(text)
    assert error.line == line_of(text, "headers:") and message in error.message


def test_header_conditions_load() -> None:
    headers = "{x-env: prod, x-debug: {present: false}, x-trace: {prefix: t-}}"
    text = IDP + JWT_ROUTE + f"    allow:\n      headers: {headers}\n"
    rules = {h.name: h for h in load(text).routes[0].allow[0].headers}
    assert (rules["x-env"].equals, rules["x-debug"].present, rules["x-trace"].prefix) == ("prod", False, "t-")


async def test_a_header_condition_written_with_underscores_is_the_header_with_dashes() -> None:
    """A request's `x_client` is read as x-client (as Django and Flask read it); a rule written `x_client` was
    looked up as is, under a name no request has: a deny rule on it never held."""
    text = IDP + "deny:\n  - {name: evil, headers: {x_client: evil}}\n" + PUBLIC_ROUTE
    policy = load(text)
    assert [h.name for h in policy.deny[0].conditions.headers] == ["x-client"]
    engine = Engine(policy, {})
    for headers in ({"x-client": "evil"}, {"x_client": "evil"}):
        d = await engine.check(RequestView("GET", "/healthz", headers=headers))
        assert (d.status, d.deny_rule) == (403, "evil"), headers
    assert (await engine.check(RequestView("GET", "/healthz", headers={"x-client": "good"}))).allowed
    await engine.close()


# ---------------------------------------------------------------------------------------------------------------
# CEL `when`: errors at file:line:column.


def when_error(when: str) -> tuple[str, ConfigError]:
    text = IDP + JWT_ROUTE + "    allow:\n      when: " + when
    return text, only(text)


def column_of(text: str, line: int, needle: str) -> int:
    return text.splitlines()[line - 1].index(needle) + 1


def test_a_syntax_error_in_a_plain_scalar_is_at_its_file_line_and_column() -> None:
    text, error = when_error('claims.tenant == "a" && (roles +) \n')
    line = line_of(text, "when:")
    assert (error.file, error.line, error.column) == ("p.yaml", line, column_of(text, line, ")"))
    assert error.message.startswith("routes[0] (r).allow.when: Syntax error:")
    assert str(error).startswith(f"p.yaml:{line}:{error.column}: ")


def test_a_syntax_error_at_the_end_of_the_expression() -> None:
    text, error = when_error('claims.tenant == "a" &&\n')
    line = line_of(text, "when:")
    assert (error.line, error.column) == (line, len(text.splitlines()[line - 1]) + 1)


@pytest.mark.parametrize("when", ['\'subject == "a" && 1 + "b" == 2\'', "\"subject == 'a' && 1 + 'b' == 2\""])
def test_a_type_error_in_a_quoted_scalar_is_at_its_file_line_and_column(when: str) -> None:
    text, error = when_error(when + "\n")
    line = line_of(text, "when:")
    assert (error.line, error.column) == (line, column_of(text, line, "+"))
    assert "no matching overload for '_+_'" in error.message


def test_a_type_error_on_the_second_line_of_a_block_scalar() -> None:
    text = (
        IDP
        + JWT_ROUTE
        + (
            "    allow:\n"
            "      - scopes_any: [a]\n"
            "      - when: |\n"
            '          subject == "a" &&\n'
            '            size(subject) == "x"\n'
        )
    )
    error = only(text)
    line = line_of(text, "size(subject)")
    assert (error.line, error.column) == (line, column_of(text, line, "=="))
    assert error.message.startswith("routes[0] (r).allow[1].when: found no matching overload for '_==_'")


def test_an_unknown_field_in_a_deny_rule_is_at_its_position() -> None:
    text = IDP + JWT_ROUTE + "    allow: {}\n    deny:\n      - name: m\n        when: request.metod == 'GET'\n"
    error = next(e for e in refused(text) if "has no field" in e.message)
    line = line_of(text, "request.metod")
    assert (error.line, error.column) == (line, column_of(text, line, ".metod"))  # CEL places a selection at its dot
    assert error.message.endswith("`request` has no field `metod` (it has headers, host, method, path, query, scheme)")


def test_a_deny_rule_whose_when_fails_to_compile_gets_one_error() -> None:
    text = IDP + JWT_ROUTE + "    allow: {}\n    deny:\n      - name: m\n        when: request.metod == 'GET'\n"
    (error,) = refused(text)
    assert "has no field" in error.message


def test_a_type_error_after_escapes_in_a_double_quoted_scalar() -> None:
    text, error = when_error('"subject == \\"a\\" && 1 + \\"b\\" == 2"\n')
    line = line_of(text, "when:")
    assert (error.line, error.column) == (line, column_of(text, line, "+"))


def test_a_type_error_on_the_continuation_line_of_a_plain_scalar() -> None:
    text = IDP + JWT_ROUTE + '    allow:\n      when: subject == "a" &&\n        size(subject) == "x"\n'
    error = only(text)
    line = line_of(text, "size(subject)")
    assert (error.line, error.column) == (line, column_of(text, line, "=="))


def test_a_when_over_4_kib_is_refused() -> None:
    over = f'subject == "{"a" * 4085}"'  # 4098 bytes, few nodes: only the byte bound refuses it
    text, error = when_error(f"'{over}'\n")
    assert (error.line, error.column) == (line_of(text, "when:"), column_of(text, line_of(text, "when:"), "subject"))
    assert error.message.endswith(f"the expression is {len(over)} bytes, more than the 4096 allowed")
    fits = f'subject == "{"a" * 4083}"'
    assert len(fits) == 4096
    assert load(IDP + JWT_ROUTE + f"    allow:\n      when: '{fits}'\n").routes[0].allow[0].when is not None
    wide = "é" * 2043  # 4086 bytes in UTF-8, 2043 characters: the bound is in bytes
    assert "more than the 4096 allowed" in when_error(f"'subject == \"{wide}\"'\n")[1].message


@pytest.mark.parametrize(
    ("when", "message", "at"),
    [
        (
            "'roles.exists(r, scopes.exists(s, r == s))'",
            "a comprehension (all, exists, ...) may not be nested inside another one",
            "scopes.exists",
        ),
        ("'subject.matches(claims.pattern)'", "the pattern of matches() must be a string literal", "claims.pattern"),
        ("'subject.matches(\"(a)\\\\1\")'", "RE2 cannot use this pattern: invalid escape sequence: \\1", '"(a)'),
    ],
    ids=["nested-comprehension", "non-literal-pattern", "backreference"],
)
def test_hostile_expressions_are_refused_at_load(when: str, message: str, at: str) -> None:
    text, error = when_error(when + "\n")
    line = line_of(text, "when:")
    assert error.line == line and message in error.message
    # The position is inside the offending part of the expression.
    start = column_of(text, line, at)
    assert start <= error.column <= start + len(at) + 1


def test_a_non_bool_when_and_an_undeclared_variable_are_refused() -> None:
    assert "must be true or false, this is int" in when_error("size(roles)\n")[1].message
    text, error = when_error('user == "alice"\n')
    line = line_of(text, "when:")
    assert (error.line, error.column) == (line, column_of(text, line, "user"))
    assert "undeclared reference to 'user'" in error.message


def test_every_when_error_in_a_policy_is_reported_at_once() -> None:
    text = IDP + JWT_ROUTE + "    allow:\n      - when: 'subject +'\n      - when: '1 + \"a\" == 2'\n"
    errors = refused(text)
    assert [(e.line, e.column) for e in errors] == [
        (line_of(text, "subject +"), column_of(text, line_of(text, "subject +"), "+") + 1),
        (line_of(text, '1 + "a"'), column_of(text, line_of(text, '1 + "a"'), "+")),
    ]


def test_a_type_error_on_the_second_line_of_a_folded_block() -> None:
    text, error = when_error('>\n        claims.tenant == "a" &&\n        1 + "x" == 2\n')
    line = line_of(text, "when:") + 2
    assert (error.line, error.column) == (line, column_of(text, line, "+"))
