"""Every native module is the one in use unless AGENT_NO_EXTENSIONS=1 (then its pure twin is)."""

from __future__ import annotations

import importlib

import pytest

from tests.conftest import native_module


@pytest.mark.parametrize(
    "selector,name,native",
    [
        ("agent._wire", "decode_check_request", "_wire"),
        ("agent.authn._b64", "b64url_decode", "_b64"),
        ("agent.authn._jsonobj", "strict_json_object", "_jsonobj"),
        ("agent.authn._claims", "check_claims", "_claims"),
        ("agent.ratelimit._bucket", "BucketTable", "_bucket"),
        ("agent.audit._auditq", "RecordQueue", "_auditq"),
        ("agent.audit._auditq", "JsonChain", "_auditq"),
    ],
)
def test_the_extension_is_loaded_unless_disabled(selector: str, name: str, native: str) -> None:
    chosen = getattr(importlib.import_module(selector), name)
    module = native_module(native)
    if module is None:
        assert chosen.__module__.endswith("_py")
    else:
        assert chosen is getattr(module, name)


def test_the_native_transport_is_available_unless_disabled() -> None:
    from agent.server.native_transport import available

    assert available() == (native_module("_h2") is not None)
