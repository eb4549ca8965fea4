"""A policy file cannot stall or crash the loader through YAML aliases or nesting (the control plane reads many
teams')."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.config import load_policy_text
from agent.config.yamlsrc import MAX_DEPTH, MAX_VALUES, load_yaml
from agent.errors import ConfigError, ConfigErrors

HEAD = "version: 1\nservice: s\n"


def refused(text: str) -> tuple[int, str]:
    with pytest.raises(ConfigErrors) as caught:
        load_policy_text(text, "p.yaml")
    (error,) = caught.value.errors
    return error.line, error.message


@pytest.mark.parametrize("cycle", ["x: &a [*a]\n", "x: &a {k: *a}\n", "x: &a {k: [1, {j: *a}]}\n"])
def test_an_alias_inside_itself_is_a_load_error_with_its_line(cycle: str) -> None:
    line, message = refused(HEAD + cycle + "routes: []\n")
    assert line == 3 and "alias" in message


def test_nested_aliases_expanding_past_the_bound_are_refused_at_once() -> None:
    # 400 bytes for 9**7 (4.8 million) values: converted one by one, that took seconds, and 9**9 hours.
    lines = [HEAD.rstrip("\n"), "x0: &x0 [a, a, a, a, a, a, a, a, a]"]
    lines += [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, 7)]
    start = time.perf_counter()
    line, message = refused("\n".join(lines) + "\nroutes: []\n")
    assert f"more than {MAX_VALUES} values" in message and 3 <= line <= 9
    assert time.perf_counter() - start < 5


def test_aliases_and_merge_keys_within_the_bound_still_load() -> None:
    text = HEAD + (
        "identity_providers:\n"
        "  corp: {issuer: 'https://a.example', jwks_uri: 'https://a.example/j', audiences: [a], algorithms: [RS256]}\n"
        "x-common: &common {authn: [jwt], allow: {roles_any: [r]}}\n"
    )
    with pytest.raises(ConfigErrors) as caught:  # x-common is not a policy key: the file was read whole
        load_policy_text(text + "routes:\n  - {<<: *common, name: a, match: {path: /a}}\n", "p.yaml")
    assert [e.message.split(";")[0] for e in caught.value.errors] == ["policy: unknown key 'x-common'"]


def test_nesting_past_python_s_recursion_limit_is_a_load_error_at_its_line() -> None:
    # PyYAML composes recursively: this was a RecursionError, which stopped the control plane's poll for good.
    line, message = refused(HEAD + "routes:\n  - " + "[" * 3000 + "]" * 3000 + "\n")
    assert (line, message) == (4, f"nested more than {MAX_DEPTH} levels deep")


def test_block_nesting_is_refused_at_the_line_where_it_goes_too_deep() -> None:
    text = "".join("  " * i + f"k{i}:\n" for i in range(MAX_DEPTH + 5)) + "  " * (MAX_DEPTH + 5) + "x: 1\n"
    with pytest.raises(ConfigError) as caught:
        load_yaml(text, "p.yaml")
    assert caught.value.line == MAX_DEPTH + 1  # line 1 opens the first mapping, the key on line 65 the 65th
    assert load_yaml("a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1), "p.yaml")  # up to the bound: read


def test_aliases_nesting_deeper_than_the_text_are_refused() -> None:
    lines = [HEAD.rstrip("\n"), "x0: &x0 [1]"] + [f"x{i}: &x{i} [*x{i - 1}]" for i in range(1, 3000)]
    line, message = refused("\n".join(lines) + "\nroutes: []\n")
    assert message == f"nested more than {MAX_DEPTH} levels deep (through YAML aliases)" and line >= 3


@pytest.mark.parametrize("path", ["agent/demo/policy.yaml", "agent/demo/policy.test.yaml",
                                  "tests/fixtures/design_policy.yaml"])  # fmt: skip
def test_the_shipped_files_are_far_from_the_bound(path: str) -> None:
    def depth(value: object) -> int:
        if isinstance(value, dict):
            return 1 + max(map(depth, value.values()), default=0)
        if isinstance(value, list):
            return 1 + max(map(depth, value), default=0)
        return 0

    root = Path(__file__).parent.parent.parent
    assert depth(load_yaml((root / path).read_text(), path)) <= MAX_DEPTH // 4
