"""The policy reference lists every reason code and every policy key the loader accepts, and its examples load."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml

from agent import reasons as R
from agent.config import conditions, load_policy_text, loader, routes
from agent.errors import ConfigErrors

ROOT = Path(__file__).parent.parent.parent
DOC = (ROOT / "docs" / "policy.md").read_text()
WHOLE = "version: 1\n"  # a whole policy starts so; any other block must say it is a fragment
FRAGMENT = "# fragment"
WARNS = "# lint warns"  # the line of an example that lint warns about says so


def test_every_reason_code_is_documented() -> None:
    codes = {v for k, v in vars(R).items() if k.isupper()}
    assert {c for c in codes if f"`{c}`" not in DOC} == set()


def test_every_policy_key_is_documented() -> None:
    keys = loader.TOP_KEYS | loader.IDP_KEYS | loader.ROUTE_KEYS | loader.ALLOW_KEYS | loader.MATCH_KEYS
    keys |= loader.DPOP_KEYS | loader.HMAC_CLIENT_KEYS | loader.RATE_LIMIT_KEYS | loader.SHARED_STATE_KEYS
    keys |= (
        loader.ALERT_KEYS
        | loader.NEW_SOURCE_NETWORK_KEYS
        | loader.DENY_KEYS
        | loader.HMAC_KEY_KEYS
        | conditions.HEADER_MATCH_KEYS
    )
    keys |= set(routes.RATE_LIMIT_PARTS) | {"header:NAME", "claim:PATH"}
    assert {k for k in keys if f"`{k}" not in DOC and f"{k}`" not in DOC} == set()


def yaml_blocks(path: Path) -> list[tuple[int, str]]:
    """Every ```yaml block of a Markdown file: (line of its first line, its text without indentation, after
    as many empty lines as precede it in the file, so that errors name the file's own line numbers)."""
    out = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = re.fullmatch(r"( *)```yaml", lines[i])
        if opening is None:
            i += 1
            continue
        indent = len(opening.group(1))
        end = lines.index(" " * indent + "```", i + 1)
        text = "".join(line[indent:] + "\n" for line in lines[i + 1 : end])
        out.append((i + 2, "\n" * (i + 1) + text))
        i = end + 1
    return out


BLOCKS = [
    (f"{name}:{line}", text) for name in ("docs/policy.md", "README.md") for line, text in yaml_blocks(ROOT / name)
]
POLICIES = [(where, text) for where, text in BLOCKS if text.lstrip("\n").startswith(WHOLE)]
FRAGMENTS = [(where, text) for where, text in BLOCKS if not text.lstrip("\n").startswith(WHOLE)]
# A fragment that is one route's `allow` is loaded as the allow of this route (its path binds what they use).
ROUTE = """\
version: 1
service: orders
identity_providers:
  corp: {issuer: "https://idp.example.com", jwks_uri: "https://idp.example.com/jwks.json", audiences: [a],
         algorithms: [RS256]}
routes:
  - name: r
    match: {path: "/v1/customers/{customer}/orders/{id}"}
    authn: [jwt]
"""


def test_the_examples_are_found() -> None:
    assert len(POLICIES) >= 5
    assert any(where.startswith("README.md") for where, _ in POLICIES)
    assert len(FRAGMENTS) >= 2


@pytest.mark.parametrize("where,text", FRAGMENTS, ids=[w for w, _ in FRAGMENTS])
def test_every_other_block_is_a_fragment_that_fits_a_policy(where: str, text: str) -> None:
    text = text.lstrip("\n")
    assert text.startswith(FRAGMENT), f"{where}: start it with 'version: 1' (a whole policy) or '{FRAGMENT}'"
    doc = yaml.safe_load(text)
    if isinstance(doc, dict) and set(doc) == {"allow"}:
        allow = textwrap.indent(text, "    ")
        try:
            load_policy_text(ROUTE + allow, f"{where} in a route")
        except ConfigErrors as e:
            pytest.fail(f"the allow at {where} does not load in a route:\n{e}")


@pytest.mark.parametrize("where,text", POLICIES, ids=[w for w, _ in POLICIES])
def test_every_whole_policy_example_loads(where: str, text: str) -> None:
    # Loading reads no keys (jwks_uri is fetched by the running agent), so the examples need no network.
    try:
        policy = load_policy_text(text, where.partition(":")[0])
    except ConfigErrors as e:
        pytest.fail(f"the example at {where} does not load:\n{e}")
    marked = {n for n, line in enumerate(text.splitlines(), 1) if WARNS in line}
    warned = {line for line, _ in policy.warnings}
    assert warned == marked, f"{where}: lint warns on lines {sorted(warned)}, the example says {sorted(marked)}"


TESTING_DOC = ROOT / "docs" / "policy-testing.md"


def test_the_policy_testing_example_runs_and_passes(tmp_path: Path) -> None:
    """docs/policy-testing.md's policy and its test file, exactly as printed, pass; the failing example's output
    is what the runner prints."""
    from agent.policytest import run_file

    blocks = [text for _, text in yaml_blocks(TESTING_DOC)]
    policies = [b for b in blocks if b.lstrip("\n").startswith(WHOLE)]
    tests = [b for b in blocks if b.lstrip("\n").startswith("policy:")]
    assert len(policies) == 1 and len(tests) == 1
    (tmp_path / "orders.yaml").write_text(policies[0])
    (tmp_path / "orders.test.yaml").write_text(tests[0])
    result = run_file(tmp_path / "orders.test.yaml")
    assert result.errors == [] and result.failed == 0 and result.passed == 4
    assert any("billing-batch.key_file" in n and "throwaway" in n for n in result.notes)

    # "A case that gets another answer than it expects fails with ...": alice's token with orders:write only
    from agent.policytest.report import case_lines

    printed = re.findall(r"\n```\n(FAIL .*?)```", TESTING_DOC.read_text(), re.S)
    assert len(printed) == 1
    wrong = tests[0].lstrip("\n").replace('scope: "orders:read", tenant_id', 'scope: "orders:write", tenant_id', 1)
    (tmp_path / "orders.yaml").write_text(policies[0].lstrip("\n"))  # the lines the printed trace names
    (tmp_path / "orders.test.yaml").write_text(wrong)
    failing = run_file(tmp_path / "orders.test.yaml").cases[0]
    assert "\n".join(case_lines(failing)) + "\n" == printed[0]


def test_every_test_file_key_is_documented() -> None:
    from agent.policytest import cases

    doc = TESTING_DOC.read_text()
    keys = cases.TOP_KEYS | cases.CASE_KEYS | cases.REQUEST_KEYS | cases.TOKEN_KEYS | cases.EXPECT_KEYS
    assert {k for k in keys if f"| `{k}` |" not in doc} == set()
