"""Strict JSON objects: the orjson + C-scan twin and the stdlib twin accept, refuse and return the same."""

from __future__ import annotations

import importlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import native_module, twins

MODULES = twins("agent.authn._jsonobj_py", "_jsonobj")


@pytest.fixture(params=MODULES, scope="module")
def sj(request: pytest.FixtureRequest) -> Any:
    return importlib.import_module(request.param)


def outcome(mod: Any, raw: bytes) -> tuple[str, Any]:
    try:
        return "ok", mod.strict_json_object(raw)
    except ValueError:
        return "refused", None


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def texts(draw: st.DrawFn) -> bytes:
    doc = draw(st.dictionaries(st.text(max_size=5), values, max_size=5))
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(text)))
        text = (
            text[:i]
            + draw(
                st.sampled_from(
                    [
                        ',"a":1',
                        '"a":1,',
                        ', "\\u0061": 2',
                        '{"k":1,"k":1}',
                        "NaN",
                        "1e400",
                        '"\\ud800"',
                        "18446744073709551616",
                        "[" * 40 + "]" * 40,
                        " ",
                        "\\",
                        '"',
                        ":",
                        "\ufeff",
                        "é",
                        "-0",
                        "1.5e3",
                    ]
                )
            )
            + text[i:]
        )
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()) and raw:
        j = draw(st.integers(0, len(raw) - 1))
        raw = raw[:j] + bytes([draw(st.integers(0, 255))]) + raw[j + 1 :]
    return raw


@settings(max_examples=3000, deadline=None)
@given(texts())
def test_twins_agree_on_every_input(raw: bytes) -> None:
    from agent.authn import _jsonobj_py

    native = native_module("_jsonobj")
    if native is None:
        pytest.skip("no extension")
    assert outcome(native, raw) == outcome(_jsonobj_py, raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":1,"a":2}',
        b'{"a":1,"\\u0061":2}',
        b'{"x":{"a":1,"a":1}}',
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":1e400}',
        b'{"a":"\\ud800"}',
        b"[1]",
        b"\xef\xbb\xbf{}",
        b'{"a":"\xff"}',
        b"{" + b'"a":[' * 40 + b"1" + b"]" * 40 + b"}",
        b'{"a":1} x',
    ],
)
def test_refused(sj: Any, raw: bytes) -> None:
    with pytest.raises(ValueError):
        sj.strict_json_object(raw)


def test_big_integers_stay_integers(sj: Any) -> None:
    assert sj.strict_json_object(b'{"a":18446744073709551616,"b":"x:y","c":{"d":[1,{"e":2}]}}') == {
        "a": 18446744073709551616,
        "b": "x:y",
        "c": {"d": [1, {"e": 2}]},
    }


def test_400_digit_integers_come_back_as_the_same_int_from_both_twins(sj: Any) -> None:
    # The claim checks, not the parser, refuse them; both twins must hand over the same exact int.
    huge = 10**399
    raw = f'{{"exp":{huge},"nbf":-{huge},"x":[{huge}]}}'.encode()
    assert sj.strict_json_object(raw) == {"exp": huge, "nbf": -huge, "x": [huge]}


def test_integers_beyond_pythons_digit_limit_are_refused_not_raised_otherwise(sj: Any) -> None:
    with pytest.raises(ValueError):
        sj.strict_json_object(b'{"exp":' + b"9" * 5000 + b"}")
