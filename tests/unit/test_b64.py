"""Strict base64url: the Cython decoder and its pure twin agree on every string, valid or not."""

from __future__ import annotations

import base64
import importlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import native_module, twins

MODULES = twins("agent.authn._b64_py", "_b64")


@pytest.fixture(params=MODULES, scope="module")
def b64(request: pytest.FixtureRequest) -> Any:
    return importlib.import_module(request.param)


def outcome(mod: Any, s: str) -> bytes | None:
    try:
        return bytes(mod.b64url_decode(s))
    except ValueError:
        return None


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=80))
def test_round_trip_of_every_byte_string(b64: Any, raw: bytes) -> None:
    assert b64.b64url_decode(base64.urlsafe_b64encode(raw).rstrip(b"=").decode()) == raw


alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/= \\n.éÿ€"


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=alphabet, max_size=24))
def test_twins_accept_and_refuse_the_same_strings(s: str) -> None:
    from agent.authn import _b64_py

    native = native_module("_b64")
    if native is None:
        pytest.skip("no extension")
    assert outcome(native, s) == outcome(_b64_py, s)


@pytest.mark.parametrize("bad", ["YQ==", "YQ=", "a+b/", "a b", "A", "YR", "YWJ", "é", "YWJj\n"])
def test_refused(b64: Any, bad: str) -> None:
    with pytest.raises(ValueError):
        b64.b64url_decode(bad)
