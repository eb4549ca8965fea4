"""A `when` error names the file's own line and column, however the YAML writes the expression: folded and plain
multi-line scalars join lines, quoted ones have escapes, a block may say its indentation."""

from __future__ import annotations

import pytest

from agent.config import load_policy_text
from agent.errors import ConfigErrors

HEAD = """\
version: 1
service: s
identity_providers:
  corp: {issuer: "https://a.example", jwks_uri: "https://a.example/j", audiences: [a], algorithms: [RS256]}
routes:
  - name: r
    match: {path: /x}
    authn: [jwt]
"""
# Each writes `subject == "a" && request.metod == "x"`; the error is at the `.` of `.metod`.
CASES = {
    "flow, single-quoted": '    allow: {when: \'subject == "a" && request.metod == "x"\'}\n',
    "folded": '    allow:\n      when: >-\n        subject == "a" &&\n        request.metod == "x"\n',
    "folded, clipped": '    allow:\n      when: >\n        subject == "a" &&\n        request.metod == "x"\n',
    "plain over two lines": '    allow:\n      when: subject == "a" &&\n        request.metod == "x"\n',
    "double-quoted with escapes": '    allow: {when: "subject == \\"a\\" && request.metod == \'x\'"}\n',
    "single-quoted with escapes": "    allow: {when: 'subject == ''a'' && request.metod == \"x\"'}\n",
    "double-quoted over two lines": (
        '    allow:\n      when: "subject == \\"a\\" &&\n        request.metod == \\"x\\""\n'
    ),
    "literal": '    allow:\n      when: |\n        subject == "a" &&\n        request.metod == "x"\n',
    "literal with its indentation": (
        '    allow:\n      when: |2\n          subject == "a" &&\n          request.metod == "x"\n'
    ),
    "unicode before it": '    allow: {when: \'subject == "😀é" && request.metod == "x"\'}\n',
    "a \\u escape before it": '    allow: {when: "subject == \\"\\u00e9\\" && request.metod == \\"x\\""}\n',
}


@pytest.mark.parametrize("body", CASES.values(), ids=CASES.keys())
def test_the_error_points_at_the_file_position_of_the_mistake(body: str) -> None:
    text = HEAD + body
    with pytest.raises(ConfigErrors) as caught:
        load_policy_text(text, "p.yaml")
    (error,) = caught.value.errors
    assert "no field `metod`" in error.message
    line = text.splitlines()[error.line - 1]
    assert line[error.column - 1 :].startswith(".metod"), (error.line, error.column, line)


def test_a_syntax_error_at_the_end_of_a_folded_expression_points_past_its_last_character() -> None:
    text = HEAD + '    allow:\n      when: >-\n        subject == "a" &&\n        request.method ==\n'
    with pytest.raises(ConfigErrors) as caught:
        load_policy_text(text, "p.yaml")
    (error,) = caught.value.errors
    assert (error.line, error.column) == (12, len("        request.method ==") + 1)
