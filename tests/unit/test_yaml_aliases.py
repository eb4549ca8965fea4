"""A policy file cannot stall or crash the loader through YAML aliases (the control plane reads many teams')."""

from __future__ import annotations

import time

import pytest

from agent.config import load_policy_text
from agent.config.yamlsrc import MAX_VALUES
from agent.errors import ConfigErrors

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
